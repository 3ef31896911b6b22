"""The documentation stays true: its commands run, its links resolve, and the site builds.

Convention for commands in README.md and docs/**/*.md: a fenced block whose info string is
``console`` is meant to be run.  In it, a line that starts with ``$ `` is a command (``lipverify ...``
only); the lines after it, up to the next ``$ `` line or the end of the block, are its output as it was
shown when the page was written.  This test runs every such command (each distinct command once) in a
temporary working directory, with ``../shared/data`` replaced by the real-data folder the other tests
use (``tests/conftest.py``; commands that name it are skipped when it is absent), and checks that

* it exits with code 0, and
* the first output line shown in the page appears in what it printed (runs of spaces compared as one).

Only the first line is compared: later lines hold timings and numbers that may move.  Keep the
commands cheap (the built-in model, ``--limit`` small).  A block that takes minutes (``audit``) is
marked by the line ``<!-- docs-test: slow -->`` right before its fence: it runs only when
``LIPVERIFY_DOCS_SLOW=1`` and is skipped with that reason otherwise.  Blocks with any other info
string (``bash``, ``text``, none) are illustrations and are not run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REALDATA

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DATA_PREFIX = "../shared/data"


@dataclass
class Example:
    command: str
    expected: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    slow: bool = False


def _console_examples() -> dict[str, Example]:
    examples: dict[str, Example] = {}
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        in_block, current, slow, previous = False, None, False, ""
        for no, line in enumerate(lines, 1):
            stripped = line.strip()
            if not in_block:
                in_block = stripped == "```console"
                slow = previous == "<!-- docs-test: slow -->"
                if stripped:
                    previous = stripped
                continue
            if stripped.startswith("```"):
                in_block, current = False, None
                continue
            if stripped.startswith("$ "):
                cmd = stripped[2:].strip()
                current = examples.setdefault(cmd, Example(cmd))
                current.where.append(f"{page.relative_to(ROOT)}:{no}")
                current.slow = current.slow or slow
                current.expected.append("")
            elif current is not None and stripped and not current.expected[-1]:
                current.expected[-1] = stripped
    return examples


EXAMPLES = _console_examples()


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def test_docs_have_runnable_examples():
    assert any(c.startswith("lipverify audit") for c in EXAMPLES), "the walkthrough's audit command is missing"
    assert any(c.startswith("lipverify certify") for c in EXAMPLES), "the walkthrough's certify command is missing"


@pytest.mark.parametrize("command", sorted(EXAMPLES), ids=lambda c: c[:60])
def test_console_example_runs(command, tmp_path):
    ex = EXAMPLES[command]
    argv = shlex.split(command)
    assert argv[0] == "lipverify", f"{ex.where}: only lipverify commands are run ({command!r})"
    if ex.slow and os.environ.get("LIPVERIFY_DOCS_SLOW") != "1":
        pytest.skip("marked docs-test: slow (minutes on a CPU); set LIPVERIFY_DOCS_SLOW=1 to run it")
    if any(DATA_PREFIX in a for a in argv):
        if REALDATA is None:
            pytest.skip("real third-party data not found: set LIPVERIFY_REALDATA or place ../shared/data")
        argv = [a.replace(DATA_PREFIX, str(REALDATA)) for a in argv]
    real = str(REALDATA) if REALDATA is not None else DATA_PREFIX
    env = dict(os.environ, COLUMNS="100", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "lipverify", *argv[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    out = _norm(proc.stdout + "\n" + proc.stderr)
    assert proc.returncode == 0, f"{ex.where}: {command!r} exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    for where, first in zip(ex.where, ex.expected):
        if first:
            first = first.replace(DATA_PREFIX, real)
            assert _norm(first) in out, (f"{where}: the page shows {first!r} after {command!r}, the command "
                                         f"printed:\n{(proc.stdout + proc.stderr)[:2000]}")


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_relative_links_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are not links
    targets = [a or b for a, b in _LINK.findall(text)]
    assert targets, "README.md links to no documentation page"
    broken = []
    for t in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", t) or t.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = t.split("#", 1)[0]
        if not (ROOT / path).exists():
            broken.append(t)
    assert not broken, f"README.md links to missing files: {broken}"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install '.[docs]')")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python is not installed")
    pytest.importorskip("mkdocs_click", reason="mkdocs-click is not installed")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site"),
                           "-f", str(ROOT / "mkdocs.yml")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "site" / "index.html").exists()
