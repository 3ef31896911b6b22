"""The command line: a thin layer over the Python API, one module per command.

``lipverify bounds | certify | attack | audit | finetune | train``.  Each command module holds its options and
its output formatting; the work is done by the API (:func:`lipverify.load`, :class:`lipverify.LipModel`,
:func:`lipverify.train.finetune`, ...).  Nothing in lipverify imports this package: it sits on top.
"""

from __future__ import annotations

import importlib

import click

__all__ = ["EXIT_INTERNAL", "EXIT_UNSOUND", "EXIT_USER", "handle_errors", "main"]

#: command -> its one-line help, shown by ``lipverify --help`` without importing the command (and torch);
#: a test checks each against the command's own docstring
COMMANDS = {
    "bounds": "Lipschitz bounds: per-layer constants, global bound, margin constants K_ij.",
    "certify": "Certified radius per input (global GloRo rule, or IBP-masked local bounds).",
    "attack": "Empirical robustness: an adversarial radius per input and the robust accuracy per eps.",
    "audit": "Two-sided report: sound bounds and certificates next to lower bounds and attacks.",
    "finetune": "Certified fine-tuning: make MODEL's certified radii larger, and re-verify every claim.",
    "train": "Train a certifiable architecture from scratch (GloRo ConvNets, LiResNet) and re-verify it.",
}


def __getattr__(name):  # the shared helpers, without importing torch for `lipverify --help`
    if name in ("EXIT_INTERNAL", "EXIT_UNSOUND", "EXIT_USER", "handle_errors"):
        from lipverify.cli import common

        return getattr(common, name)
    raise AttributeError(f"module 'lipverify.cli' has no attribute {name!r}")


class _Group(click.Group):
    """click's group, with usage errors (a bad option value, a missing option) as one line on stderr
    and exit 2, like every other refusal; commands are imported when they run (``--help``,
    ``--version`` and a mistyped command never import torch)."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        mod = importlib.import_module(f"lipverify.cli.{name}")
        return getattr(mod, name)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        import sys

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx is not None else "lipverify"
            click.echo(f"lipverify: error: {exc.format_message()} (see {cmd} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("lipverify: error: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lipverify")
def main():
    """lipverify: sound Lipschitz bounds, certified radii, attacks and certified fine-tuning for
    classifiers you did not train.  MODEL is an .onnx file, a TorchScript/.pt2 file, a state dict
    (with --arch), or omitted / builtin:default for the embedded MNIST model."""
