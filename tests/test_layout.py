"""The package layout's rules, read from the imports of every module (so a change that breaks one fails).

* nothing below the command line imports :mod:`lipverify.cli`;
* :mod:`lipverify.bounds` (proven upper bounds) and :mod:`lipverify.attacks` (the empirical side that
  checks them) never import each other, and certification never imports the attacks;
* :mod:`lipverify.graph` imports no analysis: only itself, :mod:`lipverify.errors` and :mod:`lipverify.limits`;
* no module imports another module's underscore names;
* every sub-package says in its ``__init__`` docstring what it holds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "lipverify"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(imported module, imported name or None, line) for every import in the file, nested ones too."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([mod] if mod else []))
            for a in node.names:
                yield mod, a.name, node.lineno


MODULES = sorted(ROOT.rglob("*.py"))


def _within(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def _edges():
    for path in MODULES:
        me = _module_name(path)
        for mod, name, line in _imports(path):
            if not _within(mod, "lipverify"):
                continue
            target = f"{mod}.{name}" if name and (ROOT.parent / (f"{mod}.{name}".replace(".", "/") + ".py")).exists() \
                else mod
            yield me, target, name, f"{path.relative_to(ROOT.parent)}:{line}"


def test_the_layout_is_read_from_real_modules():
    # the checks below are only meaningful if they see the package and its imports
    mods = {_module_name(p) for p in MODULES}
    for pkg in ("lipverify.graph", "lipverify.importers", "lipverify.data", "lipverify.certify", "lipverify.bounds",
                "lipverify.attacks", "lipverify.report", "lipverify.cli", "lipverify.train"):
        assert pkg in mods
    assert sum(1 for _ in _edges()) > 100


def test_nothing_imports_the_cli():
    bad = [where for me, target, _, where in _edges()
           if _within(target, "lipverify.cli") and not _within(me, "lipverify.cli") and me != "lipverify.__main__"]
    assert not bad, bad


@pytest.mark.parametrize("a,b", [("lipverify.bounds", "lipverify.attacks"), ("lipverify.attacks", "lipverify.bounds"),
                                 ("lipverify.certify", "lipverify.attacks"), ("lipverify.attacks", "lipverify.certify"),
                                 ("lipverify.attacks", "lipverify.graph")])
def test_independent_families(a, b):
    bad = [where for me, target, _, where in _edges() if _within(me, a) and _within(target, b)]
    assert not bad, f"{a} imports {b}: {bad}"


def test_graph_imports_no_analysis():
    bad = [where for me, target, _, where in _edges() if _within(me, "lipverify.graph")
           and not (_within(target, "lipverify.graph") or target in ("lipverify.errors", "lipverify.limits"))]
    assert not bad, bad


def test_no_underscore_names_across_modules():
    bad = []
    for me, target, name, where in _edges():
        if name and name.startswith("_") and not name.startswith("__") and target != me:
            bad.append(f"{where}: {name} from {target}")
    assert not bad, bad


def test_every_subpackage_says_what_it_holds():
    for init in ROOT.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init} has no docstring saying what it holds"


def test_no_module_left_at_the_top_but_the_api():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "arguments.py", "errors.py", "limits.py", "model.py", "results.py"], top
