"""Certified fine-tuning of an imported classifier, end to end (the work behind ``lipverify finetune``).

:func:`finetune` takes someone else's ONNX or PyTorch classifier and returns, in ``--out DIR``:

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
import sys
import time
from pathlib import Path

import torch

from lipverify.data import load_for_model
from lipverify.errors import UserInputError
from lipverify.importers.loader import resolve_device
from lipverify.importers.torchfile import Unregistered
from lipverify.report.progress import progress_bar

EXIT_SIGNAL = {2: 130, 15: 143}
#: exit code of ``finetune`` / ``train`` when the run diverged (outputs written from the best epoch)
EXIT_DIVERGED = 4
OUTPUT_FILES = ("model.onnx", "model.pt", "report.json", "curves.png", "certified_accuracy.png", "checkpoint.pt")


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
    inner = lm.module.model
    if isinstance(inner, Unregistered):
        inner = inner.wrapped
        for p in inner.parameters():
            p.requires_grad_(True)
    gm = copy.deepcopy(inner)
    for m in gm.modules():
        m.training = False
    return gm


def loss_defaults(loss: str) -> dict:
    """The defaults that depend on the loss: the eps ramp of the loss's paper (EMMA: LiResNet's 0.1 eps ->
    1.5 eps by mid-training; GloRo, TRADES, local: GloRo's log ramp) and the learning rate of a
    fine-tuning run (Adam 5e-3: the papers' 1e-3 is for runs of hundreds of epochs from scratch; on
    runs of tens of epochs 5e-3 certified 64-79% instead of 34-41% on kw_mnist at l2 0.3, see
    docs/benchmarks.md)."""
    return {"eps_schedule": "liresnet" if loss == "emma" else "log", "lr": 5e-3}


FINETUNE_DEFAULTS = {
    "model": None, "input_shape": None, "mean": None, "std": None, "arch": None, "trust_pickle": False,
    "no_fidelity_check": False, "device": "cpu", "layout": "nchw", "limit": None, "eval_data": None,
    "eval_limit": None, "loss": "gloro", "eval_eps": None, "eps_mult": 1.0, "eps_schedule": None,
    "eps_ramp_epochs": None, "trades_lambda": "1.0", "epochs": 10, "batch_size": 256, "lr": None,
    "warmup_epochs": None, "min_lr_factor": 0.0, "weight_decay": 0.0, "power_iters": 2, "activation": "keep",
    "lln": False, "augment": "", "amp": False, "sparsity_weight": 0.01, "seed": 0, "threads": None, "norm": "2",
    "resume": False, "force": False, "stop_after_epochs": None, "quiet": False,
    "grad_clip": None, "keep_last": False, "warm_start_epochs": 0.0, "warm_start_weight": 0.1,
    "residual_scale": None, "from_scratch": False,
}


def finetune(data_path, eps, out_dir, *, echo=None, **options) -> dict:
    """Certified fine-tuning (see the module docstring); the Python form of ``lipverify finetune``.

    ``data_path``, ``eps`` (one radius, a float or text such as ``"36/255"``) and ``out_dir`` are
    required; every other option of the command is a keyword with the command's default
    (:data:`FINETUNE_DEFAULTS`), e.g. ``finetune("train.npz", 0.3, "out", model="m.onnx", loss="trades")``.
    Returns the report written to ``out_dir/report.json`` (rank 0; other ranks return ``{}``).

    Warnings
    --------
    Raises :class:`~lipverify.train.loop.Interrupted` after writing a checkpoint when stopped by a
    signal (or by ``stop_after_epochs``); :class:`~lipverify.errors.UserInputError` for bad options.
    """
    unknown = sorted(set(options) - set(FINETUNE_DEFAULTS))
    if unknown:
        raise TypeError(f"finetune() got unknown options: {', '.join(unknown)}")
    o = {**FINETUNE_DEFAULTS, **options, "data_path": str(data_path), "eps": str(eps), "out_dir": str(out_dir)}
    ok = False
    try:
        rep = run_finetune(o, echo)
        ok = True
        return rep
    finally:
        from lipverify.train.distributed import finish

        finish(ok)


def run_finetune(o: dict, echo=None) -> dict:
    """The whole fine-tuning job.  ``o``: every option (see :func:`finetune`).  Returns the report (rank
    0; other ranks return ``{}``).  Raises :class:`~lipverify.train.loop.Interrupted` after writing a
    checkpoint when stopped by a signal."""
    import lipverify
    from lipverify.certify import parse_eps, repr_eps
    from lipverify.data.atomic import check_not_input, check_output, staged_outputs
    from lipverify.importers.normalize import PixelSpaceModel
    from lipverify.train import checkpoint as ckpt_mod
    from lipverify.train import distributed, report, surgery
    from lipverify.train.local import LocalBound
    from lipverify.train.loop import Interrupted, TrainConfig, Trainer, TrainStep
    from lipverify.train.trainable import (
        GloroBound,
        build_trainable_graph,
        check_graph,
        select_trainable,
    )

    echo = echo or (lambda msg: print(msg, file=sys.stderr))
    t_job = time.perf_counter()

    out_dir = check_output(o["out_dir"], o.get("model"), o.get("data_path"), o.get("eval_data"), folder=True)
    for name in OUTPUT_FILES:
        check_not_input(out_dir / name, o.get("model"), o.get("data_path"), o.get("eval_data"))

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
    o = {**o, **{k: v for k, v in loss_defaults(o["loss"]).items() if o.get(k) is None}}
    if not (o["lr"] > 0):
        raise UserInputError("--lr must be positive")
    from lipverify.train import recipe as recipe_mod

    grad_clip = recipe_mod.DEFAULT_GRAD_CLIP if o.get("grad_clip") is None else float(o["grad_clip"])
    if not (grad_clip >= 0):
        raise UserInputError("--grad-clip must be 0 (no clipping) or positive")
    if o.get("limit") is not None and int(o["limit"]) < 1:
        raise UserInputError(f"--limit must be at least 1, got {o['limit']}")
    if o.get("stop_after_epochs") is not None and o["stop_after_epochs"] < 1:
        raise UserInputError("--stop-after-epochs must be at least 1")
    augment = _parse_augment(o.get("augment"))
    if o.get("threads"):
        if o["threads"] < 1:
            raise UserInputError("--threads must be at least 1")
        torch.set_num_threads(int(o["threads"]))
    device_name = resolve_device(o["device"])
    ctx = distributed.setup(device_name)
    dev = ctx.device
    torch.manual_seed(o["seed"])

    ckpt_path = out_dir / ckpt_mod.NAME
    cfg = TrainConfig(loss=o["loss"], eps=eps, eps_mult=o["eps_mult"], eps_schedule=o["eps_schedule"],
                      eps_ramp=o["eps_ramp_epochs"], trades_lambda=str(o["trades_lambda"]), epochs=o["epochs"],
                      batch_size=o["batch_size"], lr=o["lr"], warmup=o["warmup_epochs"],
                      min_lr_factor=o["min_lr_factor"], weight_decay=o["weight_decay"], power_iters=o["power_iters"],
                      seed=o["seed"], augment=augment, amp=o["amp"], sparsity_weight=o["sparsity_weight"],
                      norm=o["norm"], grad_clip=grad_clip, warm_start=float(o.get("warm_start_epochs") or 0.0),
                      warm_weight=float(o["warm_start_weight"] if o.get("warm_start_weight") is not None else 0.1))
    cfg.eps_at()  # validates the schedule
    cfg.lam_at()
    run_id = {**cfg.to_dict(), "activation": o["activation"], "lln": bool(o["lln"]), "limit": o.get("limit"),
              "residual_scale": o.get("residual_scale"),
              "limit_sampling": "random" if o.get("limit") else None,
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
    lm = lipverify.load(o.get("model") or lipverify.BUILTIN_DEFAULT, input_shape=o.get("input_shape"),
                        mean=o.get("mean"), std=o.get("std"), arch=o.get("arch"), trust_pickle=bool(o.get("trust_pickle")),
                        fidelity_check=not o.get("no_fidelity_check"), device=str(dev))
    if lm.n_classes < 2:
        raise UserInputError(f"the model has {lm.n_classes} output; fine-tuning needs a classifier with at least two "
                             "logits", lm.name)
    special = lm.graph.domain_nodes()
    if special:
        from lipverify.importers.names import describe_nodes

        where = describe_nodes(lm.module.model, [lm.graph.nodes[i] for i in special])
        raise UserInputError(f"fine-tuning needs global Lipschitz constants, and {len(special)} node(s) have none "
                             f"(bounded on an input domain only): {where}; products (gates), normalisations and "
                             "attention cannot be fine-tuned yet", str(o.get("model") or ""))
    outside = o.get("mean") is not None or o.get("std") is not None
    # --limit: a random subset seeded by --seed (a file sorted by class would give a few classes); the
    # whole file is read first (load_data's own limit reads only the first rows)
    ds = load_for_model(lm, o["data_path"], layout=o["layout"], limit=None, outside_normalisation=outside,
                        need_labels=True)
    sub = recipe_mod.random_subset_index(len(ds.y), o.get("limit"), o["seed"])
    if sub is not None:
        ds = ds.subset(sub)
    if o.get("eval_data"):
        eds = load_for_model(lm, o["eval_data"], layout=o["layout"], limit=o.get("eval_limit"),
                             outside_normalisation=outside, need_labels=True)
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
               + (f" (--limit {o['limit']} drew a random subset)" if o.get("limit") else ""))
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
        with progress_bar(len(eval_y), "certifying (before)", o["quiet"]) as adv:
            before = report.sound_evaluation(lm, eds.x, eds.y, eval_eps, cfg.norm, progress=adv)

    # -- trainable network --------------------------------------------------------------------------------
    gm = _training_module(lm).to(dev)
    normalizer = lm.module.normalize
    plan: list[dict] = []
    calib = train_x[:256]
    if normalizer is not None:
        calib = normalizer(calib)
    from lipverify.train.convert import fold_batchnorm, steep_activations

    conversion = fold_batchnorm(gm, calib[:64])  # function-preserving; BatchNorm scales into their layers
    conversion["steep_activations"], steep_notes = steep_activations(lm.graph)
    notes += conversion["notes"] + steep_notes
    if o.get("residual_scale"):  # also on --resume (deterministic; the checkpoint then sets the weights)
        from lipverify.train.residual import scale_residual_branches

        rs = scale_residual_branches(gm, calib, float(o["residual_scale"]), train_y[:256])
        conversion["residual_scale"] = {k: v for k, v in rs.items() if k != "notes"}
        notes += rs["notes"]
        for line in rs["notes"]:
            echo(line)
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
        trainer.load_state_dict(saved, ckpt_path)
        ckpt_mod.set_rng_state(saved["rng"], ckpt_path)
        echo(f"resumed from {ckpt_path} at epoch {trainer.epoch}" + (f", step {trainer.step}" if trainer.step else ""))
    estimate0 = saved.get("estimate_before") if saved else bound.global_estimate()
    restore_best = not o.get("keep_last")
    if ctx.is_main and restore_best:
        trainer.snapshot_start()  # the fallback when every epoch diverged (a resumed run keeps its own)
    diverged = saved.get("diverged") if saved else None
    chance = recipe_mod.chance_level(lm.n_classes, ds.y, eds.y)
    # a network at random initialisation (lipverify train) has no accuracy to fall from
    start_acc = before.get("clean_accuracy") if before and not o.get("from_scratch") else None
    converted_acc = conversion.get("residual_scale", {}).get("accuracy_after")
    if converted_acc is not None and start_acc is not None:
        start_acc = min(start_acc, converted_acc)  # the conversion changed the function: judge from there
    hopeless = recipe_mod.hopeless_eps(before, eps) if before else None
    if hopeless is not None and hopeless["hopeless"]:
        msg = recipe_mod.hopeless_message(hopeless, eps)
        notes.append(msg)
        echo(f"warning: {msg}")
    recipe = {"grad_clip": grad_clip, "grad_clip_note": "global gradient norm, after AMP unscaling; 0 = off",
              "nonfinite_steps": "skipped (no update); "
                                 f"{recipe_mod.MAX_CONSECUTIVE_SKIPS} in a row or half an epoch stops the run",
              "restore_best": restore_best,
              "best_by": "eval VRA estimate at eps, then eval accuracy estimate (on the evaluation data)",
              "collapse_stop": f"accuracy <= {100 * recipe_mod.collapse_line(chance):.1f}% (chance "
                               f"{100 * chance:.1f}%) after starting above "
                               f"{100 * (recipe_mod.collapse_line(chance) + recipe_mod.CLEARLY_ABOVE):.1f}%, a "
                               f"non-finite loss, or a loss > {recipe_mod.EXPLODE_LOSS:g} and "
                               f"{recipe_mod.EXPLODE_FACTOR:g}x the best earlier epoch's",
              "limit": (f"random subset of {o['limit']} (seed {o['seed']})" if o.get("limit") else None),
              "eval_limit": "first N examples" if o.get("eval_limit") else None}

    def save_checkpoint():
        if not ctx.is_main:
            return
        st = trainer.state_dict()
        st.update({"config": run_id, "before": before, "estimate_before": estimate0, "world": ctx.world,
                   "model_sha256": ckpt_mod.file_fingerprint(o.get("model")), "plan": plan, "lln_path": lln_path,
                   "diverged": diverged})
        ckpt_mod.save(ckpt_path, st)

    # -- training -------------------------------------------------------------------------------------------
    from lipverify.train.loop import catch_signals

    stop_after = o.get("stop_after_epochs")
    done_now = 0
    if ctx.is_main:
        echo(f"fine-tuning: loss {cfg.loss}, eps {eps:g} (training eps {cfg.eps_schedule}, target "
             f"{cfg.eps_at().target:g}), {cfg.epochs} epochs x {trainer.steps_per_epoch} steps, batch "
             f"{trainer.global_batch}, {len(trainable)} parameter tensors trained, device {dev}")
        echo(f"recipe: gradient clip {grad_clip:g} (global norm{'' if grad_clip else ': off'}), non-finite steps "
             f"skipped, {'best epoch (eval VRA estimate) kept and restored' if restore_best else 'last epoch kept'}, "
             f"stop on divergence or collapse to chance (<= {100 * recipe_mod.collapse_line(chance):.1f}% accuracy)")
    with catch_signals(trainer):
        while trainer.epoch < cfg.epochs and not diverged:
            e = trainer.epoch
            total = trainer.steps_per_epoch
            with progress_bar(total, f"epoch {e + 1}/{cfg.epochs}", o["quiet"] or not ctx.is_main) as adv:
                if trainer.step:
                    adv(trainer.step)
                rec = trainer.train_epoch(adv, save_checkpoint)
            reason = None
            if ctx.is_main:
                reason = recipe_mod.divergence_reason(rec, trainer.history[:-1], start_acc, chance)
                if reason is None and restore_best and trainer.consider_best(rec):
                    rec["best_so_far"] = True
            diverged = ctx.broadcast_object(reason)
            save_checkpoint()
            ctx.barrier()
            if ctx.is_main:
                ev = (f", eval acc {100 * rec['eval_accuracy_estimate']:.1f}% VRA {100 * rec['eval_vra_estimate']:.1f}%"
                      if "eval_vra_estimate" in rec else "")
                echo(f"epoch {rec['epoch']}/{cfg.epochs}: loss {rec['loss']:.4f}, train acc "
                     f"{100 * rec['train_accuracy']:.1f}% VRA {100 * rec['train_vra_estimate']:.1f}%{ev} (estimates), "
                     f"bound ~{rec['global_bound_estimate']:.4g}, eps_train {rec['eps_train']:.4g}, "
                     f"{rec['time_s']:.1f}s" + (f", {rec['skipped_steps']} non-finite steps skipped"
                                                if rec.get("skipped_steps") else ""))
            if diverged:
                break
            done_now += 1
            if stop_after is not None and done_now >= stop_after and trainer.epoch < cfg.epochs:
                raise Interrupted(0)
    train_s = sum(h["time_s"] for h in trainer.history)
    if not ctx.is_main:
        return {}

    # -- the best epoch ------------------------------------------------------------------------------------
    restored = trainer.restore_best() if restore_best else None
    final_epoch = restored if restored is not None else trainer.epoch
    recipe.update({"diverged": bool(diverged), "divergence": diverged, "epochs_done": trainer.epoch,
                   "best_epoch": trainer.best["epoch"] if trainer.best else None,
                   "restored_epoch": restored, "exported_epoch": final_epoch})
    if diverged:
        notes.append(f"the run diverged ({diverged}); training stopped after epoch {trainer.epoch}")
        echo(f"TRAINING DIVERGED: {diverged}; stopped after epoch {trainer.epoch}")
    if restored is not None:
        msg = (f"restored the state after epoch {restored} (the best eval VRA / accuracy estimate; the last epoch, "
               f"{trainer.epoch}, was worse)" if restored else
               "restored the input model (epoch 0): no trained epoch was usable")
        notes.append(msg)
        echo(msg)

    # -- export and sound re-verification ------------------------------------------------------------------
    t0 = time.perf_counter()
    surgery.bake(gm)
    gm_cpu = copy.deepcopy(gm).cpu().float()
    for m in gm_cpu.modules():
        m.training = False
    onnx_bytes = report.export_onnx_bytes(gm_cpu, lm.input_shape)
    # staged: the verified model, the state dict, the plots and report.json appear together or not at all;
    # an interruption (Ctrl-C, SIGTERM) removes the staging folder and the model being verified
    with staged_outputs(out_dir, last="report.json") as stage:
        verify_path = stage / "model.onnx"
        verify_path.write_bytes(onnx_bytes)
        lm_after = lipverify.load(str(verify_path), mean=o.get("mean"), std=o.get("std"),
                                  fidelity_inputs=eval_x[:32].cpu() if o.get("mean") is None and o.get("std") is None
                                  else None, device=str(dev), name=str(out_dir / "model.onnx"))
        fmt = _input_format(o.get("model"), o.get("arch"))
        sd_bytes = report.state_dict_bytes(gm_cpu)
        pt_check = _check_state_dict(o, gm_cpu, plan, lm_after, eval_x[:64])
        export_s = time.perf_counter() - t0
        echo(f"re-verifying the exported model with the sound bound on {len(eval_y)} inputs ...")
        with progress_bar(len(eval_y), "certifying (after)", o["quiet"]) as adv:
            after = report.sound_evaluation(lm_after, eds.x, eds.y, eval_eps, cfg.norm, progress=adv)
        after_local = None
        if cfg.loss == "local":
            after_local = report.sound_evaluation(lm_after, eds.x, eds.y, eval_eps, cfg.norm, method="local")
            est = report.local_estimate_vra(lm_after, eds.x, eds.y, eval_eps, cfg.norm)
            after_local["vra_estimate"] = est
            after_local["estimate_gap"] = {k: est[k] - after_local["vra"].get(k, 0.0) for k in est}
        (stage / "model.pt").write_bytes(sd_bytes)

        eps_keys = [repr_eps(e) for e in eval_eps]
        curves = report.curves_png(trainer.history, eps)
        (stage / "curves.png").write_bytes(curves)
        (stage / "certified_accuracy.png").write_bytes(report.before_after_png(before, after, cfg.norm, eval_eps))
        mean_epoch = train_s / max(len(trainer.history), 1)
        line = recipe_mod.collapse_line(chance)
        if (not diverged and start_acc is not None and start_acc >= line + recipe_mod.CLEARLY_ABOVE
                and after["clean_accuracy"] <= line):
            diverged = (f"the exported model's sound clean accuracy is {100 * after['clean_accuracy']:.1f}%, at chance "
                        f"level ({100 * chance:.1f}%; the input model had {100 * start_acc:.1f}%)")
            recipe.update({"diverged": True, "divergence": diverged})
            notes.append(f"the run diverged: {diverged}")
            echo(f"warning: {diverged}")
        exported_rec = trainer.history[final_epoch - 1] if 0 < final_epoch <= len(trainer.history) else None
        bound_after = exported_rec["global_bound_estimate"] if exported_rec else estimate0
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
            "plan": plan, "lln": lln_path, "conversion": conversion,
            "before": report.public(before),
            "after": report.public(after),
            "after_local": report.public(after_local),
            "training_estimates": {
                "note": "power-iteration estimates used by the training loss; not certificates",
                "global_bound_before": estimate0,
                "global_bound_after": bound_after,
                "sound_over_estimate": after["global_bound"] / bound_after if bound_after else None,
            },
            "history": trainer.history,
            "recipe": recipe,
            "diverged": bool(diverged), "divergence": diverged,
            "time_s": {"load": load_s, "before_eval": before.get("time_s") if before else None,
                       "train": train_s, "per_epoch": mean_epoch, "export": export_s, "after_eval": after["time_s"],
                       "total_this_run": time.perf_counter() - t_job},
            "device": str(dev), "processes": ctx.world,
            "notes": notes + list(lm_after.notes),
        }
        (stage / "report.json").write_text(json.dumps(finite_json(rep), indent=2, default=json_default,
                                                     allow_nan=False))
    rows = _extra_rows(after_local, eps_keys, mean_epoch, len(trainer.history))
    rows.append(("exported epoch", "-", f"{final_epoch}" + (" (best, restored)" if restored is not None else "")))
    if diverged:
        rows.append(("DIVERGED", "-", "yes (see notes)"))
    rep["_table"] = report.table(before, after, eps_keys, rows)
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
            if "vra_estimate" in after_local:
                rows.append((f"VRA @ eps={e}, local estimate (not a certificate)", "-",
                             f"{100 * after_local['vra_estimate'].get(e, 0):.1f}%"))
    rows.append(("time per epoch (s)", "-", f"{mean_epoch:.2f} x {n_epochs}"))
    return rows


def finite_json(v):
    """Strict-JSON form of a report (:func:`lipverify.results.json_safe`: non-finite floats become
    ``None``)."""
    from lipverify.results import json_safe

    return json_safe(v)


def json_default(v):
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
    from lipverify.importers.normalize import PixelSpaceModel, make_normalizer
    from lipverify.importers.torchfile import import_arch
    from lipverify.train.surgery import apply_plan

    try:
        net = apply_plan(import_arch(o["arch"]), plan)
        sd = {k: v for k, v in gm_cpu.state_dict().items()}
        net.load_state_dict(sd, strict=True)
    except UserInputError as exc:
        return {"checked": False, "why": str(exc)}
    except Exception as exc:
        return {"checked": False, "why": f"the state dict does not load into --arch: {str(exc).splitlines()[0][:200]}"}
    net = PixelSpaceModel(net.eval(), make_normalizer(o.get("mean"), o.get("std"), lm_after.input_shape))
    with torch.no_grad():
        a = net(xs.cpu()).reshape(len(xs), -1).double()
        b = lm_after(xs).reshape(len(xs), -1).double().cpu()
    diff = float((a - b).abs().max())
    return {"checked": True, "loads_into_arch": o["arch"], "max_abs_logit_diff_vs_onnx": diff, "passed": diff < 1e-4}
