"""``lipverify finetune``: certified fine-tuning of an imported classifier, end to end.

One command takes someone else's ONNX or PyTorch classifier and returns, in ``--out DIR``:

* the fine-tuned model in the input's format (``model.onnx`` for ONNX input, ``model.pt`` state dict for a
  state-dict input) and the other one as well; both expect **the same input convention as the input
  model** (a normalisation given with ``--mean/--std`` stays outside the network);
* ``report.json`` and a printed before/after table: clean accuracy, VRA at each eps, median certified
  radius, global bound — the "after" numbers are recomputed by the sound method on the exported ONNX
  file, re-imported by :func:`lipverify.load` (onnxruntime fidelity check); training-time numbers are
  labelled estimates;
* ``curves.png`` (per-epoch curves) and ``certified_accuracy.png`` (before/after);
* ``checkpoint.pt``, written atomically after every epoch and on Ctrl-C / SIGTERM (``--resume``).

Run it on several GPUs or machines with ``torchrun --nproc_per_node N -m lipverify finetune ...``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import click
import torch

from lipverify.errors import UserInputError
from lipverify.train.losses import LOSSES
from lipverify.train.schedules import EPS_SCHEDULES

EXIT_SIGNAL = {2: 130, 15: 143}
OUTPUT_FILES = ("model.onnx", "model.pt", "report.json", "curves.png", "certified_accuracy.png", "checkpoint.pt")


def _cli():
    from lipverify import cli

    return cli


def _parse_augment(text: str | None) -> tuple:
    """``crop``, ``crop:P`` (zero padding P pixels, default H // 8), ``flip``; comma-separated."""
    if not text or text.strip().lower() in ("", "none"):
        return ()
    kinds = tuple(sorted({t.strip().lower() for t in text.split(",") if t.strip()}))
    bad = [k for k in kinds if not (k in ("crop", "flip") or (k.startswith("crop:") and k[5:].isdigit()
                                                               and int(k[5:]) >= 1))]
    if bad or sum(k.startswith("crop") for k in kinds) > 1:
        raise UserInputError(f"--augment takes crop (or crop:PIXELS) and/or flip, comma-separated; got {text!r}")
    return kinds


def _input_format(model: str | None, arch: str | None = None) -> str:
    """``builtin``, ``onnx``, ``state_dict`` (a torch file loaded with ``--arch``) or ``torch_program``
    (TorchScript, ``.pt2``, pickled module: the output is ONNX plus the converted module's state dict)."""
    if model is None or str(model).startswith("builtin:"):
        return "builtin"
    if Path(model).suffix.lower() == ".onnx":
        return "onnx"
    return "state_dict" if arch else "torch_program"


def _training_module(lm):
    """The fx GraphModule inside the LipModel (a deep copy: the loaded model stays untouched)."""
    from lipverify.loading import _Unregistered

    inner = lm.module.model
    if isinstance(inner, _Unregistered):
        inner = inner._inner
        for p in inner.parameters():
            p.requires_grad_(True)
    gm = copy.deepcopy(inner)
    for m in gm.modules():
        m.training = False
    return gm


def run_finetune(o: dict, echo=None) -> dict:
    """The whole fine-tuning job (see the module docstring).  ``o``: the command's options.  Returns the
    report (rank 0; other ranks return ``{}``).  Raises :class:`~lipverify.train.loop.Interrupted` after
    writing a checkpoint when stopped by a signal."""
    import lipverify
    from lipverify.certify import parse_eps, repr_eps
    from lipverify.io_utils import atomic_write_bytes, atomic_write_text, check_not_input
    from lipverify.loading import PixelSpaceModel
    from lipverify.train import checkpoint as ckpt_mod
    from lipverify.train import distributed, report, surgery
    from lipverify.train.local import LocalBound
    from lipverify.train.loop import Interrupted, TrainConfig, Trainer, TrainStep
    from lipverify.train.trainable import GloroBound, build_trainable_graph, check_graph, select_trainable

    cli = _cli()
    echo = echo or (lambda msg: click.echo(msg, err=True))
    t_job = time.perf_counter()

    out_dir = Path(o["out_dir"])
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError("--out must be a folder", str(out_dir))
    for name in OUTPUT_FILES:
        check_not_input(out_dir / name, o.get("model"), o.get("data_path"), o.get("eval_data"))
    for inp in (o.get("model"), o.get("data_path"), o.get("eval_data")):
        if inp and Path(inp).exists() and Path(inp).resolve() == out_dir.resolve():
            raise UserInputError("--out is one of the inputs", str(out_dir))

    eps_list = parse_eps(o["eps"])
    if len(eps_list) != 1 or eps_list[0] <= 0:
        raise UserInputError("--eps must be one positive radius (the certification target)")
    eps = eps_list[0]
    eval_eps = sorted(set(parse_eps(o["eval_eps"]) if o.get("eval_eps") else [eps]))
    if o["norm"] != "2":
        raise UserInputError("certified fine-tuning supports --norm 2 (l2 balls)")
    for k, lo in (("epochs", 1), ("batch_size", 1), ("power_iters", 1)):
        if int(o[k]) < lo:
            raise UserInputError(f"--{k.replace('_', '-')} must be at least {lo}")
    if not (o["lr"] > 0):
        raise UserInputError("--lr must be positive")
    if o.get("stop_after_epochs") is not None and o["stop_after_epochs"] < 1:
        raise UserInputError("--stop-after-epochs must be at least 1")
    augment = _parse_augment(o.get("augment"))
    if o.get("threads"):
        if o["threads"] < 1:
            raise UserInputError("--threads must be at least 1")
        torch.set_num_threads(int(o["threads"]))
    device_name = cli.resolve_device(o["device"])
    ctx = distributed.setup(device_name)
    dev = ctx.device
    torch.manual_seed(o["seed"])

    ckpt_path = out_dir / ckpt_mod.NAME
    cfg = TrainConfig(loss=o["loss"], eps=eps, eps_mult=o["eps_mult"], eps_schedule=o["eps_schedule"],
                      eps_ramp=o["eps_ramp_epochs"], trades_lambda=str(o["trades_lambda"]), epochs=o["epochs"],
                      batch_size=o["batch_size"], lr=o["lr"], warmup=o["warmup_epochs"],
                      min_lr_factor=o["min_lr_factor"], weight_decay=o["weight_decay"], power_iters=o["power_iters"],
                      seed=o["seed"], augment=augment, amp=o["amp"], sparsity_weight=o["sparsity_weight"],
                      norm=o["norm"])
    cfg.eps_at()  # validates the schedule
    cfg.lam_at()
    run_id = {**cfg.to_dict(), "activation": o["activation"], "lln": bool(o["lln"]), "limit": o.get("limit"),
              "data": str(Path(o["data_path"]).resolve()), "model": str(o.get("model") or lipverify.BUILTIN_DEFAULT),
              "mean": o.get("mean"), "std": o.get("std")}
    saved = None
    if o["resume"]:
        saved = ckpt_mod.load(ckpt_path)
        ckpt_mod.check_resume_config(saved["config"], run_id)
        if saved.get("model_sha256") != ckpt_mod.file_fingerprint(o.get("model")):
            raise UserInputError("--resume: the input model file changed since the checkpoint was written",
                                 o.get("model"))
        if saved.get("world") != ctx.world:
            raise UserInputError(f"--resume: the checkpoint was written by {saved.get('world')} process(es), "
                                 f"now {ctx.world}; resume with the same number")
    elif ckpt_path.exists() and not o["force"]:
        raise UserInputError("the --out folder already holds a checkpoint: pass --resume to continue that run or "
                             "--force to start over", str(out_dir))

    # -- model and data ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    lm = cli.load_model(o.get("model"), o.get("input_shape"), o.get("mean"), o.get("std"), o.get("arch"),
                        o.get("trust_pickle"), o.get("no_fidelity_check"), str(dev))
    ds = cli.load_dataset(lm, o["data_path"], o["layout"], o.get("limit"), o.get("mean"), o.get("std"))
    if o.get("eval_data"):
        eds = cli.load_dataset(lm, o["eval_data"], o["layout"], o.get("eval_limit"), o.get("mean"), o.get("std"))
        eval_note = None
    else:
        eds = ds if not o.get("eval_limit") else ds.subset(slice(0, o["eval_limit"]))
        eval_note = "no --eval-data: the before/after report is on the training data"
    if augment and len(lm.input_shape) != 3:
        raise UserInputError(f"--augment needs image inputs (C, H, W); the model input is {lm.input_shape}")
    train_x = ds.x.to(dev)
    train_y = ds.y.to(dev)
    eval_x, eval_y = eds.x.to(dev), eds.y.to(dev)
    load_s = time.perf_counter() - t0

    notes: list[str] = []
    if eval_note:
        notes.append(eval_note)
    seen = int(torch.unique(ds.y).numel())
    if seen < lm.n_classes:
        msg = (f"the training data covers only {seen} of the model's {lm.n_classes} classes"
               + (" (--limit keeps the first examples of the file; is it sorted by class?)" if o.get("limit") else ""))
        notes.append(msg)
        if ctx.is_main:
            echo(f"warning: {msg}")
    if ctx.enabled:
        notes.append(f"distributed: {ctx.world} processes (DDP, {'nccl' if dev.type == 'cuda' else 'gloo'}), global "
                     f"batch {cfg.batch_size}")

    # -- sound evaluation before --------------------------------------------------------------------------
    before = saved.get("before") if saved else None
    if before is None and ctx.is_main:
        echo(f"evaluating the input model on {len(eval_y)} inputs (sound bound) ...")
        with cli.progress_bar(len(eval_y), "certifying (before)", o["quiet"]) as adv:
            before = report.sound_evaluation(lm, eds.x, eds.y, eval_eps, cfg.norm, progress=adv)

    # -- trainable network --------------------------------------------------------------------------------
    gm = _training_module(lm).to(dev)
    normalizer = lm.module.normalize
    plan: list[dict] = []
    calib = train_x[:256]
    if normalizer is not None:
        calib = normalizer(calib)
    if o["activation"] == "minmax":
        plan += surgery.swap_relu(gm, "minmax", calib)
    if cfg.loss == "local":
        if o["activation"] == "minmax":
            notes.append("--loss local with MinMax: no learnable thresholds (MinMax units are never constant)")
        else:
            plan += surgery.swap_relu(gm, "clip", calib)
    lln_path = surgery.normalize_last_layer(gm) if o["lln"] else None
    notes += surgery.describe_plan(plan, lln_path)
    net = PixelSpaceModel(gm, normalizer).to(dev)
    for m in net.modules():
        m.training = False
    graph = build_trainable_graph(gm, lm.input_shape, normalizer, dev)
    bound = GloroBound(net, graph, power_iters=cfg.power_iters, seed=cfg.seed)
    check_graph(net, graph, lm.input_shape, dev)
    trainable, frozen = select_trainable(net, graph)
    if frozen:
        notes.append(f"frozen (not read live by the Lipschitz graph, so not trainable): {', '.join(frozen)}")
    if not trainable:
        raise UserInputError("the model has no parameter that fine-tuning can train soundly")
    local = (LocalBound(bound, gm, normalizer, len(train_y), power_iters=cfg.power_iters,
                        sparsity_weight=cfg.sparsity_weight) if cfg.loss == "local" else None)
    step_module = TrainStep(bound, cfg, local).to(dev)
    wrapped = step_module
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(step_module, device_ids=[ctx.local_rank] if dev.type == "cuda" else None,
                      broadcast_buffers=True, find_unused_parameters=True)
    trainer = Trainer(wrapped, train_x, train_y, cfg, ctx, eval_x if ctx.is_main else None,
                      eval_y if ctx.is_main else None)
    if saved is not None:
        trainer.load_state_dict(saved)
        ckpt_mod.set_rng_state(saved["rng"])
        echo(f"resumed from {ckpt_path} at epoch {trainer.epoch}" + (f", step {trainer.step}" if trainer.step else ""))
    estimate0 = saved.get("estimate_before") if saved else bound.global_estimate()

    def save_checkpoint():
        if not ctx.is_main:
            return
        st = trainer.state_dict()
        st.update({"config": run_id, "before": before, "estimate_before": estimate0, "world": ctx.world,
                   "model_sha256": ckpt_mod.file_fingerprint(o.get("model")), "plan": plan, "lln_path": lln_path})
        ckpt_mod.save(ckpt_path, st)

    # -- training -------------------------------------------------------------------------------------------
    from lipverify.train.loop import catch_signals

    stop_after = o.get("stop_after_epochs")
    done_now = 0
    if ctx.is_main:
        echo(f"fine-tuning: loss {cfg.loss}, eps {eps:g} (training eps {cfg.eps_schedule}, target "
             f"{cfg.eps_at().target:g}), {cfg.epochs} epochs x {trainer.steps_per_epoch} steps, batch "
             f"{trainer.global_batch}, {len(trainable)} parameter tensors trained, device {dev}")
    with catch_signals(trainer):
        while trainer.epoch < cfg.epochs:
            e = trainer.epoch
            total = trainer.steps_per_epoch
            with cli.progress_bar(total, f"epoch {e + 1}/{cfg.epochs}", o["quiet"] or not ctx.is_main) as adv:
                if trainer.step:
                    adv(trainer.step)
                rec = trainer.train_epoch(adv, save_checkpoint)
            save_checkpoint()
            ctx.barrier()
            if ctx.is_main:
                ev = (f", eval acc {100 * rec['eval_accuracy_estimate']:.1f}% VRA {100 * rec['eval_vra_estimate']:.1f}%"
                      if "eval_vra_estimate" in rec else "")
                echo(f"epoch {rec['epoch']}/{cfg.epochs}: loss {rec['loss']:.4f}, train acc "
                     f"{100 * rec['train_accuracy']:.1f}% VRA {100 * rec['train_vra_estimate']:.1f}%{ev} (estimates), "
                     f"bound ~{rec['global_bound_estimate']:.4g}, eps_train {rec['eps_train']:.4g}, "
                     f"{rec['time_s']:.1f}s")
            done_now += 1
            if stop_after is not None and done_now >= stop_after and trainer.epoch < cfg.epochs:
                raise Interrupted(0)
    train_s = sum(h["time_s"] for h in trainer.history)
    if not ctx.is_main:
        return {}

    # -- export and sound re-verification ------------------------------------------------------------------
    t0 = time.perf_counter()
    surgery.bake(gm)
    gm_cpu = copy.deepcopy(gm).cpu().float()
    for m in gm_cpu.modules():
        m.training = False
    onnx_bytes = report.export_onnx_bytes(gm_cpu, lm.input_shape)
    verify_path = out_dir / ".model.verify.onnx"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(verify_path, onnx_bytes)
    try:
        lm_after = lipverify.load(str(verify_path), mean=o.get("mean"), std=o.get("std"),
                                  fidelity_inputs=eval_x[:32].cpu() if o.get("mean") is None and o.get("std") is None
                                  else None, device=str(dev), name=str(out_dir / "model.onnx"))
    except Exception:
        verify_path.unlink(missing_ok=True)
        raise
    fmt = _input_format(o.get("model"), o.get("arch"))
    sd_bytes = report.state_dict_bytes(gm_cpu)
    pt_check = _check_state_dict(o, gm_cpu, plan, lm_after, eval_x[:64])
    export_s = time.perf_counter() - t0
    echo(f"re-verifying the exported model with the sound bound on {len(eval_y)} inputs ...")
    with cli.progress_bar(len(eval_y), "certifying (after)", o["quiet"]) as adv:
        after = report.sound_evaluation(lm_after, eds.x, eds.y, eval_eps, cfg.norm, progress=adv)
    after_local = None
    if cfg.loss == "local":
        after_local = report.sound_evaluation(lm_after, eds.x, eds.y, eval_eps, cfg.norm, method="local")
    verify_path.replace(out_dir / "model.onnx")  # verified: now it is the output
    atomic_write_bytes(out_dir / "model.pt", sd_bytes)

    eps_keys = [repr_eps(e) for e in eval_eps]
    curves = report.curves_png(trainer.history, eps)
    atomic_write_bytes(out_dir / "curves.png", curves)
    atomic_write_bytes(out_dir / "certified_accuracy.png",
                       report.before_after_png(before, after, cfg.norm, eval_eps))
    mean_epoch = train_s / max(len(trainer.history), 1)
    rep = {
        "tool": "lipverify finetune",
        "model": str(o.get("model") or lipverify.BUILTIN_DEFAULT),
        "input_format": fmt,
        "outputs": {
            "primary": "model.pt" if fmt == "state_dict" else "model.onnx",
            "model.onnx": "fine-tuned network, ONNX opset 17, re-imported and re-verified by lipverify.load",
            "model.pt": _pt_description(fmt, plan),
            "input_convention": ("same as the input model: raw inputs"
                                 if o.get("mean") is None and o.get("std") is None else
                                 f"same as the input model: normalise outside with mean {o.get('mean')} "
                                 f"std {o.get('std')} (not part of the exported network)"),
            "state_dict_check": pt_check,
        },
        "data": {"train": o["data_path"], "n_train": len(train_y),
                 "eval": o.get("eval_data") or o["data_path"], "n_eval": len(eval_y)},
        "eps": eps, "eval_eps": eval_eps, "norm": cfg.norm,
        "config": run_id,
        "plan": plan, "lln": lln_path,
        "before": report.public(before),
        "after": report.public(after),
        "after_local": report.public(after_local),
        "training_estimates": {
            "note": "power-iteration estimates used by the training loss; not certificates",
            "global_bound_before": estimate0,
            "global_bound_after": trainer.history[-1]["global_bound_estimate"] if trainer.history else None,
            "sound_over_estimate": (after["global_bound"] / trainer.history[-1]["global_bound_estimate"]
                                    if trainer.history and trainer.history[-1]["global_bound_estimate"] else None),
        },
        "history": trainer.history,
        "time_s": {"load": load_s, "before_eval": before.get("time_s") if before else None,
                   "train": train_s, "per_epoch": mean_epoch, "export": export_s, "after_eval": after["time_s"],
                   "total_this_run": time.perf_counter() - t_job},
        "device": str(dev), "processes": ctx.world,
        "notes": notes + list(lm_after.notes),
    }
    atomic_write_text(out_dir / "report.json", json.dumps(_finite(rep), indent=2, default=_json_default,
                                                          allow_nan=False))
    rep["_table"] = report.table(before, after, eps_keys, _extra_rows(after_local, eps_keys, mean_epoch,
                                                                     len(trainer.history)))
    return rep


def _pt_description(fmt: str, plan: list[dict]) -> str:
    if fmt != "state_dict":
        return "state dict of the fine-tuned network (the fx module lipverify converted the input to)"
    if not plan:
        return "state dict of the fine-tuned network; loads into the --arch network"
    return ("state dict of the fine-tuned network; loads into the --arch network after the surgery listed in "
            "'plan' (lipverify.train.surgery.apply_plan(net, plan)): ReLU modules replaced at the same paths")


def _extra_rows(after_local, eps_keys, mean_epoch, n_epochs):
    rows = []
    if after_local is not None:
        for e in eps_keys:
            rows.append((f"VRA @ eps={e}, local bound", "-", f"{100 * after_local['vra'].get(e, 0):.1f}%"))
    rows.append(("time per epoch (s)", "-", f"{mean_epoch:.2f} x {n_epochs}"))
    return rows


def _finite(v):
    """Non-finite floats become ``None`` (strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (tuple, set)):
        return list(v)
    return str(v)


def _check_state_dict(o, gm_cpu, plan, lm_after, xs) -> dict:
    """For a state-dict input, load the written state dict into a fresh ``--arch`` network (with the
    same surgery) and compare its logits with the re-imported ONNX model."""
    if _input_format(o.get("model"), o.get("arch")) != "state_dict":
        return {"checked": False, "why": "the input was not a state dict with --arch"}
    from lipverify.loading import PixelSpaceModel, _import_arch, _normalizer
    from lipverify.train.surgery import apply_plan

    try:
        net = apply_plan(_import_arch(o["arch"]), plan)
        sd = {k: v for k, v in gm_cpu.state_dict().items()}
        net.load_state_dict(sd, strict=True)
    except UserInputError as exc:
        return {"checked": False, "why": str(exc)}
    except Exception as exc:
        return {"checked": False, "why": f"the state dict does not load into --arch: {str(exc).splitlines()[0][:200]}"}
    net = PixelSpaceModel(net.eval(), _normalizer(o.get("mean"), o.get("std"), lm_after.input_shape))
    with torch.no_grad():
        a = net(xs.cpu()).reshape(len(xs), -1).double()
        b = lm_after(xs).reshape(len(xs), -1).double().cpu()
    diff = float((a - b).abs().max())
    return {"checked": True, "loads_into_arch": o["arch"], "max_abs_logit_diff_vs_onnx": diff, "passed": diff < 1e-4}


# ------------------------------------------------------------------------------------------------------
# click command


def _options(fn):
    cli = _cli()
    opts = [
        click.option("--data", "data_path", required=True, help="Training data: .npz (x, y), image folder, or VNN-LIB."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True),
        click.option("--limit", type=int, default=None, help="Use only the first N training examples."),
        click.option("--eval-data", default=None, help="Held-out data for the before/after report (default: --data)."),
        click.option("--eval-limit", type=int, default=None, help="Use only the first N evaluation examples."),
        click.option("--out", "out_dir", required=True, help="Output folder (model, report, plots, checkpoint)."),
        click.option("--loss", type=click.Choice(list(LOSSES)), default="gloro", show_default=True,
                     help="gloro: CE over [f, y_bot]; trades: GloRo-TRADES; emma: EMMA; local: local Lipschitz bounds."),
        click.option("--eps", required=True, help="Certification radius (l2, in the model's input units; pixel "
                                                  "space with --mean/--std), e.g. 0.3 or 36/255."),
        click.option("--eval-eps", default=None, help="Radii for the report, comma-separated (default: --eps)."),
        click.option("--eps-mult", type=float, default=1.0, show_default=True,
                     help="Training eps = mult x eps (GloRo trains slightly above the test radius)."),
        click.option("--eps-schedule", type=click.Choice(list(EPS_SCHEDULES)), default="log", show_default=True,
                     help="Ramp of the training eps: linear / log (GloRo) / liresnet (0.1 eps -> 1.5 eps)."),
        click.option("--eps-ramp-epochs", type=float, default=None, help="Length of the eps ramp (default: half the run)."),
        click.option("--trades-lambda", default="1.0", show_default=True, help="TRADES weight: x or start,end,epochs."),
        click.option("--epochs", type=int, default=10, show_default=True),
        click.option("--batch-size", type=int, default=256, show_default=True, help="Global batch size."),
        click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate."),
        click.option("--warmup-epochs", type=float, default=None, help="Linear warm-up (default: 5% of the run, <= 2)."),
        click.option("--min-lr-factor", type=float, default=0.0, show_default=True,
                     help="Cosine decay ends at this fraction of --lr."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True),
        click.option("--power-iters", type=int, default=2, show_default=True,
                     help="Power iterations per step (warm-started vectors)."),
        click.option("--activation", type=click.Choice(["keep", "minmax"]), default="keep", show_default=True,
                     help="minmax: replace every ReLU by MinMax (GroupSort-2)."),
        click.option("--lln", is_flag=True, help="Normalise the class rows of the last layer (LiResNet head)."),
        click.option("--augment", default="", help="Data augmentation for images: crop (random shifts with zero "
                     "padding H/8; crop:P pads P pixels) and/or flip (horizontal), e.g. crop:2,flip."),
        click.option("--amp", is_flag=True, help="Mixed precision for the network forward pass (never for the bound)."),
        click.option("--sparsity-weight", type=float, default=0.01, show_default=True,
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
    for opt in reversed(opts):
        fn = opt(fn)
    return cli.model_options(fn)


def _make_command():
    cli = _cli()

    @click.command("finetune")
    @_options
    @cli.handle_errors
    def finetune(**o):
        """Certified fine-tuning: make MODEL's certified radii larger, and re-verify every claim.

        Trains with a differentiable GloRo bound (power iteration on the model's own Lipschitz graph),
        exports the result in the input's format plus ONNX, re-imports the ONNX file and recomputes the
        before/after table with the sound bound.  Distributed: torchrun --nproc_per_node N -m lipverify
        finetune ...
        """
        from lipverify.train.loop import Interrupted

        quiet = o["quiet"]
        echo = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
        try:
            rep = run_finetune(o, echo)
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
            click.echo(json.dumps(_finite({k: v for k, v in rep.items() if not k.startswith("_")}),
                                  default=_json_default, allow_nan=False))
            return
        click.echo(rep["_table"])
        click.echo(f"\nnumbers in 'after' are re-verified with the sound bound on {o['out_dir']}/model.onnx; "
                   f"outputs in {o['out_dir']}")

    return finetune


finetune = _make_command()


def _register() -> None:
    """Make sure the command is on ``lipverify.cli.main`` even when this module was imported first."""
    cli = _cli()
    main = getattr(cli, "main", None)
    if main is not None and "finetune" not in main.commands:
        main.add_command(finetune)


_register()
