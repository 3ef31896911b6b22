"""The command line starts instantly: ``lipverify --help``, ``--version`` and a mistyped command never
import torch (commands are imported when they run), and the one-line help shown without importing
them is each command's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

import lipverify.cli as cli

PROBE = """
import sys
from lipverify.cli import main
try:
    main({args!r})
except SystemExit as e:
    code = e.code
print("\\nTORCH", "torch" in sys.modules, "CODE", code)
"""


def _run(args):
    r = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


def test_help_version_and_typo_do_not_import_torch():
    for args, code in ((["--help"], 0), (["--version"], 0), (["certfy"], 2)):
        out = _run(args)
        assert f"TORCH False CODE {code}" in out, out
    out = _run(["--help"])
    for name in cli.COMMANDS:
        assert name in out


def test_command_help_is_each_commands_own_and_every_command_is_listed():
    mods = sorted(p.stem for p in Path(cli.__file__).parent.glob("*.py") if p.stem not in ("__init__", "common"))
    assert sorted(cli.COMMANDS) == mods
    for name, text in cli.COMMANDS.items():
        cmd = cli.main.get_command(click.Context(cli.main), name)
        assert isinstance(cmd, click.Command) and cmd.name == name
        assert cmd.get_short_help_str(limit=200) == text


def test_package_attributes_load_on_first_use():
    r = subprocess.run([sys.executable, "-c", "import sys, lipverify; a = 'torch' in sys.modules; "
                        "f = lipverify.load; print(a, 'torch' in sys.modules, lipverify.BUILTIN_DEFAULT)"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "True", "builtin:default"], r.stdout + r.stderr
