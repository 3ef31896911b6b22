"""Run CLI probes the way a user runs them, in one capped subprocess.

``run_probes(probes, cap)`` starts one Python process that imports lipverify once, caps its address
space at its size after the imports plus ``cap`` bytes (``RLIMIT_AS``), and then runs each probe
through click's test runner in that process, from the probe's working directory and with its
environment additions. It returns one :class:`Outcome` per probe: the exit code, stdout, stderr and
seconds. A probe that would allocate past the cap fails inside the child (MemoryError or the
allocator's error, which lipverify reports as exit 1), never on the machine running the tests.

``python tests/hostile.py CAP < probes.json`` is the child's entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

GiB = 1 << 30


@dataclass
class Outcome:
    args: list
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    def refused(self, *words: str, within: float = 60.0) -> str:
        """Assert exit 2 with exactly one stderr line, no traceback, containing every word (case
        folded); return the line."""
        assert self.rc == 2, f"{self.args}: exit {self.rc}, stderr {self.stderr[-800:]!r}"
        assert len(self.lines) == 1, f"{self.args}: expected one line, got {self.stderr[-1500:]!r}"
        line = self.lines[0]
        assert "Traceback" not in self.stderr
        assert line.startswith("lipverify: error: "), line
        for w in words:
            assert w.lower() in line.lower(), f"{self.args}: {w!r} not in {line!r}"
        assert self.seconds < within, f"{self.args}: took {self.seconds:.1f} s"
        return line


def run_probes(probes: list[dict], cap: int = 3 * GiB, timeout: float = 600) -> list[Outcome]:
    """Each probe: ``{"args": [...], "cwd": str (optional), "env": {...} (optional), "input": str}``."""
    probes = [{"args": [str(a) for a in p["args"]], "cwd": str(p.get("cwd", os.getcwd())),
               "env": dict(p.get("env", {})), "input": p.get("input")} for p in probes]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(int(cap))], input=json.dumps(probes),
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"probe runner failed: {proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.splitlines()[-1])
    return [Outcome(p["args"], o["rc"], o["stdout"], o["stderr"], o["seconds"]) for p, o in zip(probes, out)]


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(cap: int) -> None:
    import resource

    import torch  # noqa: F401  (imported before the cap: its libraries are mapped once)
    from click.testing import CliRunner

    import lipverify.importers.onnx  # noqa: F401
    from lipverify.cli import main

    probes = json.loads(sys.stdin.read())
    limit = _vm_size() + cap
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    results = []
    home = os.getcwd()
    for p in probes:
        saved = dict(os.environ)
        os.environ.update(p["env"])
        os.chdir(p["cwd"])
        t0 = time.perf_counter()
        try:
            r = CliRunner().invoke(main, p["args"], input=p["input"])
            rc, so, se = r.exit_code, r.stdout, r.stderr
        except BaseException as exc:  # the runner itself failed: report it as the probe's outcome
            rc, so, se = -1, "", f"runner: {type(exc).__name__}: {exc}"
        results.append({"rc": rc, "stdout": so, "stderr": se, "seconds": time.perf_counter() - t0})
        os.chdir(home)
        os.environ.clear()
        os.environ.update(saved)
    sys.stdout.write("\n" + json.dumps(results) + "\n")


if __name__ == "__main__":
    _child(int(sys.argv[1]))
