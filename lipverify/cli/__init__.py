"""The command line: a thin layer over the Python API, one module per command.

``lipverify bounds | certify | attack | audit | finetune | train``.  Each command module holds its options and
its output formatting; the work is done by the API (:func:`lipverify.load`, :class:`lipverify.LipModel`,
:func:`lipverify.train.finetune`, ...).  Nothing in lipverify imports this package: it sits on top.
"""

from __future__ import annotations

import click

from lipverify.cli import attack, audit, bounds, certify, finetune, train
from lipverify.cli.common import EXIT_INTERNAL, EXIT_UNSOUND, EXIT_USER, handle_errors

__all__ = ["EXIT_INTERNAL", "EXIT_UNSOUND", "EXIT_USER", "handle_errors", "main"]


class _Group(click.Group):
    """click's group, with usage errors (a bad option value, a missing option) as one line on stderr
    and exit 2, like every other refusal."""

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


# the command modules keep their names (lipverify.cli.attack is the module; its command is .attack)
for _mod in (bounds, certify, attack, audit, finetune, train):
    main.add_command(getattr(_mod, _mod.__name__.rsplit(".", 1)[1]))
