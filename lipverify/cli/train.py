"""``lipverify train``: the certifiable architectures of the papers, trained from scratch; the work is
:func:`lipverify.train.train.train` (the fine-tuning job on a freshly built network)."""

from __future__ import annotations

import click

from lipverify.cli.common import handle_errors
from lipverify.cli.finetune import run_job, training_option_list
from lipverify.train.finetune import FINETUNE_DEFAULTS
from lipverify.train.train import TRAIN_ARCHITECTURES


def _options(fn):
    opts = [
        click.option("--arch", "arch_name", required=True,
                     help="Architecture: " + ", ".join(TRAIN_ARCHITECTURES) + " (e.g. liresnet-l6w128)."),
        click.option("--input-shape", default=None,
                     help="Per-example input shape C,H,W (default: the architecture's dataset: 1,28,28 for "
                          "2c2f/4c3f, 3,32,32 for 6c2f and LiResNet, 3,64,64 for 8c2f)."),
        click.option("--mean", default=None, help="Normalisation in front of the network: per-channel mean."),
        click.option("--std", default=None, help="Normalisation in front of the network: per-channel std."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--debug", is_flag=True, help="Show Python tracebacks."),
    ]
    for opt in reversed(training_option_list(per_arch=True) + []):
        fn = opt(fn)
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.command("train")
@_options
@handle_errors
def train(**o):
    """Train a certifiable architecture from scratch (GloRo ConvNets, LiResNet) and re-verify it.

    Builds the network at random initialisation (--seed), writes OUT/init.onnx and runs the
    fine-tuning job on it with the papers' defaults for the architecture (loss, eps schedule, epochs,
    learning rate; every option below overrides them). Outputs, checkpoints, --resume, --device and
    torchrun are those of `lipverify finetune`.
    """
    from lipverify.train.train import train as train_job

    opts = {k: v for k, v in o.items() if k in FINETUNE_DEFAULTS and k not in ("model", "arch", "input_shape")}
    run_job(lambda echo: train_job(o["arch_name"], o["data_path"], o["eps"], o["out_dir"],
                                   input_shape=o["input_shape"], echo=echo, **opts), o)
