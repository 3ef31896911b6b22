"""``lipverify finetune``: the options and the output of certified fine-tuning; the work is
:func:`lipverify.train.finetune.finetune`."""

from __future__ import annotations

import json
import sys

import click

from lipverify.cli.common import NONNEGATIVE, POSITIVE, handle_errors, model_options
from lipverify.train.finetune import EXIT_DIVERGED, EXIT_SIGNAL, FINETUNE_DEFAULTS, finite_json, json_default
from lipverify.train.finetune import finetune as finetune_job
from lipverify.train.losses import LOSSES
from lipverify.train.schedules import EPS_SCHEDULES


def training_option_list(per_arch: bool = False) -> list:
    """The options of ``finetune`` (and of ``train``, where ``per_arch`` leaves the loss, schedule, epochs
    and learning rate to the architecture's defaults)."""
    def d(v):
        return None if per_arch else v

    return [
        click.option("--data", "data_path", required=True, help="Training data: .npz (x, y), image folder, or VNN-LIB."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True),
        click.option("--limit", type=int, default=None,
                     help="Use N training examples drawn at random (seeded by --seed; the whole file is read "
                          "first, so a class-sorted file still gives every class). The l-inf distance nets of "
                          "train take the first N."),
        click.option("--eval-data", default=None, help="Held-out data for the before/after report (default: --data)."),
        click.option("--eval-limit", type=int, default=None,
                     help="Use only the first N evaluation examples (the first N, not a random subset: shuffle a "
                          "class-sorted file first)."),
        click.option("--out", "out_dir", required=True, help="Output folder (model, report, plots, checkpoint)."),
        click.option("--loss", type=click.Choice(list(LOSSES)), default=d("gloro"), show_default=not per_arch,
                     help="gloro: CE over [f, y_bot]; trades: GloRo-TRADES; emma: EMMA; local: local Lipschitz bounds."),
        click.option("--eps", required=True, help="Certification radius (l2, in the model's input units; pixel "
                                                  "space with --mean/--std), e.g. 0.3 or 36/255."),
        click.option("--eval-eps", default=None, help="Radii for the report, comma-separated (default: --eps)."),
        click.option("--eps-mult", type=POSITIVE, default=d(1.0), show_default=not per_arch,
                     help="Training eps = mult x eps (GloRo trains slightly above the test radius)."),
        click.option("--eps-schedule", type=click.Choice(list(EPS_SCHEDULES)), default=None,
                     help="Ramp of the training eps: linear / log (GloRo) / liresnet (0.1 eps -> 1.5 eps); default: "
                          "liresnet for --loss emma, log otherwise (each loss's paper)."),
        click.option("--eps-ramp-epochs", type=NONNEGATIVE, default=None, help="Length of the eps ramp (default: half the run)."),
        click.option("--trades-lambda", default="1.0", show_default=True, help="TRADES weight: x or start,end,epochs."),
        click.option("--epochs", type=int, default=d(10), show_default=not per_arch),
        click.option("--batch-size", type=int, default=256, show_default=True, help="Global batch size."),
        click.option("--lr", type=POSITIVE, default=None,
                     help="Adam learning rate (default: 5e-3 for finetune; train: the architecture's)."),
        click.option("--warmup-epochs", type=NONNEGATIVE, default=None, help="Linear warm-up (default: 5% of the run, <= 2)."),
        click.option("--min-lr-factor", type=NONNEGATIVE, default=0.0, show_default=True,
                     help="Cosine decay ends at this fraction of --lr."),
        click.option("--weight-decay", type=NONNEGATIVE, default=0.0, show_default=True),
        click.option("--grad-clip", type=NONNEGATIVE, default=None,
                     help="Clip the global gradient norm to this (after AMP unscaling; default 1000: far above a "
                          "healthy run's norms, far below a blow-up's; 0 disables). Steps with a non-finite loss or "
                          "gradient are skipped either way."),
        click.option("--warm-start-epochs", type=NONNEGATIVE, default=None,
                     help="Epochs of cross-entropy + --warm-start-weight x log(bound) before the certified loss "
                          "(its eps ramp starts after them): brings the huge bound of a normally trained network "
                          "down without losing its accuracy. Default 0."),
        click.option("--warm-start-weight", type=NONNEGATIVE, default=None,
                     help="Weight of log(bound) in the warm start (default 0.1)."),
        click.option("--residual-scale", type=POSITIVE, default=None,
                     help="Scale every residual branch so its block's bound starts near (1 + this) x its "
                          "shortcut's (LiResNet-style; not function-preserving, the accuracy cost is reported)."),
        click.option("--keep-last", is_flag=True,
                     help="Export the last epoch's network instead of restoring the best epoch (highest eval VRA "
                          "estimate, then accuracy; chosen on the evaluation data)."),
        click.option("--power-iters", type=int, default=2, show_default=True,
                     help="Power iterations per step (warm-started vectors)."),
        click.option("--activation", type=click.Choice(["keep", "minmax"]), default="keep", show_default=True,
                     help="minmax: replace every ReLU by MinMax (GroupSort-2)."),
        click.option("--lln", is_flag=True, help="Normalise the class rows of the last layer (LiResNet head)."),
        click.option("--augment", default="", help="Data augmentation for images: crop (random shifts with zero "
                     "padding H/8; crop:P pads P pixels) and/or flip (horizontal), e.g. crop:2,flip."),
        click.option("--amp", is_flag=True, help="Mixed precision for the network forward pass (never for the bound)."),
        click.option("--sparsity-weight", type=NONNEGATIVE, default=0.01, show_default=True,
                     help="--loss local: weight of the sparsity loss."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--threads", type=int, default=None,
                     help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)."),
        click.option("--norm", type=click.Choice(["2"]), default="2", show_default=True),
        click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is in --out."),
        click.option("--force", is_flag=True, help="Start over in an --out folder that already has a checkpoint."),
        click.option("--stop-after-epochs", type=int, default=None,
                     help="Stop (with a checkpoint) after this many epochs of this invocation; --resume later."),
        click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table."),
    ]


def _options(fn):
    opts = training_option_list()
    for opt in reversed(opts):
        fn = opt(fn)
    return model_options(fn)


@click.command("finetune")
@_options
@handle_errors
def finetune(**o):
    """Certified fine-tuning: make MODEL's certified radii larger, and re-verify every claim.

    Trains with a differentiable GloRo bound (power iteration on the model's own Lipschitz graph),
    exports the result in the input's format plus ONNX, re-imports the ONNX file and recomputes the
    before/after table with the sound bound.  Distributed: torchrun --nproc_per_node N -m lipverify
    finetune ...

    Guards: the global gradient norm is clipped (--grad-clip), steps with a non-finite loss are
    skipped, the best epoch (eval VRA estimate, then accuracy) is kept and exported unless
    --keep-last, and a run whose loss explodes or whose accuracy falls to chance stops early.

    Exit codes: 0 done; 2 a problem with the input; 4 the run diverged (the loss exploded or became
    non-finite, the accuracy collapsed to chance, or the exported model's sound clean accuracy is at
    chance): the outputs are still written, from the best epoch kept, and report.json says
    "diverged": true with the reason; 130 / 143 interrupted by Ctrl-C / SIGTERM (checkpoint written).
    """
    run_job(lambda echo: finetune_job(o["data_path"], o["eps"], o["out_dir"], echo=echo,
                                      **{k: v for k, v in o.items() if k in FINETUNE_DEFAULTS}), o)


def run_job(job, o) -> None:
    """Run a training job (``job(echo) -> report``) with the command's progress, interruption and output."""
    from lipverify.train.loop import Interrupted

    quiet = o["quiet"]
    echo = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    try:
        rep = job(echo)
    except Interrupted as exc:
        if exc.signum == 0:
            click.echo(f"lipverify: stopped after --stop-after-epochs; checkpoint in {o['out_dir']} "
                       "(continue with --resume)", err=True)
            return
        click.echo(f"lipverify: interrupted; checkpoint written to {o['out_dir']}/checkpoint.pt "
                   "(continue with --resume)", err=True)
        sys.exit(EXIT_SIGNAL.get(exc.signum, 130))
    if not rep:
        return
    if o["as_json"]:
        click.echo(json.dumps(finite_json({k: v for k, v in rep.items() if not k.startswith("_")}),
                              default=json_default, allow_nan=False))
    else:
        click.echo(rep["_table"])
        click.echo(f"\nnumbers in 'after' are re-verified with the sound bound on {o['out_dir']}/model.onnx; "
                   f"outputs in {o['out_dir']}")
    if rep.get("diverged"):
        rc = (rep.get("recipe") or {}).get("restored_epoch")
        scaled = bool(((rep.get("conversion") or {}).get("residual_scale") or {}).get("blocks"))
        start = ("the network after --residual-scale, before training" if scaled else "the input model")
        kept = (f"{start} (no trained epoch was usable)" if rc == 0 else
                f"the best epoch ({rc})" if rc is not None else "the last epoch")
        hint = "try a smaller --lr, a smaller --eps (or a longer --eps-ramp-epochs), or --grad-clip 1"
        if any("hopeless" in str(n) for n in rep.get("notes") or []) and not o.get("warm_start_epochs"):
            hint = ("the starting bound was hopeless for this eps: try a fine-tuning learning rate and a warm "
                    "start, e.g. --lr 3e-4 --batch-size 64 --warm-start-epochs 6 --warm-start-weight 1"
                    + ("" if scaled else " (and --residual-scale 0.1 for a residual network)"))
        click.echo("\n" + "!" * 78 + f"\nlipverify: THE RUN DIVERGED: {rep.get('divergence')}\n"
                   f"  the outputs in {o['out_dir']} hold {kept}; {hint}\n" + "!" * 78, err=True)
        sys.exit(EXIT_DIVERGED)
