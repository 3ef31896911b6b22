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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lipverify")
def main():
    """lipverify: sound Lipschitz bounds, certified radii, attacks and certified fine-tuning for
    classifiers you did not train.  MODEL is an .onnx file, a TorchScript/.pt2 file, a state dict
    (with --arch), or omitted / builtin:default for the embedded MNIST model."""


# the command modules keep their names (lipverify.cli.attack is the module; its command is .attack)
for _mod in (bounds, certify, attack, audit, finetune, train):
    main.add_command(getattr(_mod, _mod.__name__.rsplit(".", 1)[1]))
