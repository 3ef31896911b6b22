"""Training l-inf distance nets (Zhang et al. 2021, SPEC section 9) with the fine-tuning loop.

The loop (:class:`lipverify.train.loop.Trainer`: batches, Adam with warm-up and cosine decay,
checkpoints, exact resume, signals, DDP) is the one of ``finetune``; what is specific lives here:

* the "bound" of an l-inf distance net is the constant 1 (``K_ij = 2`` between any two logits), so
  :class:`LinfDistBound` has no power iteration; its forward pass runs the net in training mode (the
  mean shift uses the batch mean and updates its running mean);
* the loss (:func:`linf_hinge_loss`): ``lambda * CE(s * f(x), y) + clipped_hinge``, the hinge
  ``min(max(1 - margin / theta, 0), 1)`` on the top margin, ``s`` a learnable scale, ``theta = 3 eps``
  (the paper's MNIST 0.3 -> 0.9 and CIFAR 8/255 -> 24/255 rule of thumb, up to its tables);
* the lp relaxation: ``p = 8`` for the first 30% of the run (the paper: 5% of 450 epochs; a short CPU
  run needs more steps there), then growing exponentially to 1000 by 85% of the run, then ``p = inf``;
  ``lambda`` decays exponentially from ``lambda0 = 0.05`` to ``lambda_end = 2e-4`` over the same
  growth phase; Adam with the paper's learning rate 0.02 by default.

After training every layer is set to ``p = inf`` and the network is evaluated in evaluation mode
(running means), certified soundly (``margin > 2 eps``, l-inf), and written as ``model.pt`` (state dict)
with ``arch.py`` (its builder), which ``lipverify certify model.pt --arch arch.py:build`` reads back.
"""

from __future__ import annotations

import json
import math
import re
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lipverify.errors import UserInputError

__all__ = ["LINF_RE", "LinfDistBound", "linf_hinge_loss", "p_at", "train_linf_dist"]

LINF_RE = re.compile(r"^linf-dist-(\d+)x(\d+)$")


#: phases of the lp relaxation as fractions of the run: p = 8 until P8_END, growth until GROW_END, then inf.
#: The paper's 25/375/50 epochs (of 450) keep p = 8 for 5%; a CPU-sized run of tens of epochs has too
#: few steps for that, so p = 8 lasts 30% here.
P8_END, GROW_END = 0.30, 0.85


def p_at(t: float, epochs: float) -> float:
    """The relaxation's exponent at training time ``t`` (epochs)."""
    e1, e2 = P8_END * epochs, GROW_END * epochs
    if t < e1:
        return 8.0
    if t >= e2:
        return math.inf
    return 8.0 * (1000.0 / 8.0) ** ((t - e1) / max(e2 - e1, 1e-9))


def lam_at(t: float, epochs: float, lam0: float = 0.05, lam_end: float = 2e-4) -> float:
    e1, e2 = P8_END * epochs, GROW_END * epochs
    if t < e1:
        return lam0
    if t >= e2:
        return lam_end
    return lam0 * (lam_end / lam0) ** ((t - e1) / max(e2 - e1, 1e-9))


def linf_hinge_loss(logits: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, theta: float, lam: float):
    """``lam * CE(scale * logits, y) + mean(min(max(1 - margin / theta, 0), 1))``."""
    top = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf).amax(1)
    hinge = (1 - (top - other) / theta).clamp(0.0, 1.0)
    return lam * F.cross_entropy(scale * logits, y) + hinge.mean()


class LinfDistBound(nn.Module):
    """The training loop's bound object for an l-inf distance net (constant 1; see the module docstring)."""

    def __init__(self, net: nn.Module, n_classes: int):
        super().__init__()
        self.net = net
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("K", 2.0 * (1.0 - torch.eye(n_classes)))

    def power_step(self) -> None:
        pass

    def converge(self, **kw) -> None:
        pass

    def global_estimate(self) -> float:
        return 1.0

    def margin_constants(self) -> torch.Tensor:
        return self.K

    def forward(self, x):
        """Evaluation-mode logits (running means), as the loop's estimates use them."""
        self.net.eval()
        return self.net(x)


class LinfStep(nn.Module):
    """One training step of an l-inf distance net (the module DDP would wrap)."""

    def __init__(self, bound: LinfDistBound, cfg, epochs: int, theta: float):
        super().__init__()
        self.bound, self.cfg, self.local = bound, cfg, None
        self.epochs, self.theta = epochs, theta
        self.t = 0.0

    def set_progress(self, t: float) -> None:
        self.t = float(t)
        self.bound.net.set_p(p_at(t, self.epochs))

    def forward(self, x, y, eps, lam, idx=None, ctx=None):
        self.bound.net.train()  # mean shift: the batch mean, and its running mean updated
        logits = self.bound.net(x)
        self.bound.net.eval()
        loss = linf_hinge_loss(logits, y, self.bound.log_scale.exp(), self.theta, lam_at(self.t, self.epochs))
        return loss, logits.detach(), self.bound.K


def train_linf_dist(arch: str, data_path, eps, out_dir, *, input_shape=None, epochs: int | None = None,
                    batch_size: int = 128, lr: float | None = None, seed: int = 0, eval_data=None,
                    eval_limit: int | None = None, limit: int | None = None, layout: str = "nchw",
                    device: str = "cpu", resume: bool = False, force: bool = False, quiet: bool = False,
                    stop_after_epochs: int | None = None, echo=None, **ignored) -> dict:
    """Train ``linf-dist-<depth>x<width>`` (see the module docstring); returns the report."""
    import lipverify
    from lipverify.certify import parse_eps, repr_eps
    from lipverify.data import load_data
    from lipverify.data.atomic import check_output, staged_outputs
    from lipverify.train.finetune import finite_json
    from lipverify.importers.loader import resolve_device
    from lipverify.models.linf_dist import LinfDistNet
    from lipverify.report.progress import progress_bar
    from lipverify.train import checkpoint as ckpt_mod
    from lipverify.train import distributed, report
    from lipverify.train.loop import Interrupted, TrainConfig, Trainer, catch_signals

    echo = echo or (lambda m: None)
    m = LINF_RE.match(arch.strip().lower())
    if not m:
        raise UserInputError(f"unknown architecture {arch!r} (expected linf-dist-<depth>x<width>)")
    depth, width = int(m.group(1)), int(m.group(2))
    eps_v = parse_eps(eps)
    if len(eps_v) != 1 or not eps_v[0] > 0:
        raise UserInputError("--eps must be one positive radius")
    eps_v = eps_v[0]
    out = check_output(out_dir, data_path, eval_data, folder=True)
    ckpt_path = out / ckpt_mod.NAME
    if ckpt_path.exists() and not (resume or force):
        raise UserInputError("the --out folder has a checkpoint: --resume to continue or --force to start over",
                             str(out))
    ctx = distributed.setup(resolve_device(device))
    dev = ctx.device
    epochs = int(epochs or 20)
    lr = float(lr or 0.02)
    # data: the shape is the data's own (an .npz file's x) unless given
    if input_shape is None:
        if not str(data_path).lower().endswith(".npz"):
            raise UserInputError("give --input-shape for data that is not an .npz file", str(data_path))
        from lipverify.data.npz import npz_input_shape

        input_shape = npz_input_shape(data_path)  # from the header: nothing is decompressed
    shape = tuple(int(v) for v in input_shape)
    ds = load_data(data_path, shape, layout=layout, limit=limit)
    if not ds.labelled:
        raise UserInputError("training needs labelled examples", str(data_path))
    n_classes = max(2, int(ds.y.max()) + 1)
    eds = load_data(eval_data, shape, layout=layout, limit=eval_limit) if eval_data else \
        (ds if not eval_limit else ds.subset(slice(0, eval_limit)))
    torch.manual_seed(seed)
    net = LinfDistNet(int(torch.Size(shape).numel()), depth, width, n_classes)
    cfg = TrainConfig(loss="gloro", eps=eps_v, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, norm="inf")
    bound = LinfDistBound(net, n_classes)
    step = LinfStep(bound, cfg, epochs, theta=3.0 * eps_v).to(dev)
    trainer = Trainer(step, ds.x.to(dev), ds.y.to(dev), cfg, ctx, eds.x.to(dev), eds.y.to(dev))
    run_id = {"arch": arch, "eps": eps_v, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "data": str(data_path), "limit": limit, "shape": list(shape)}
    if resume:
        saved = ckpt_mod.load(ckpt_path)
        if saved.get("config") != run_id:
            raise UserInputError("--resume with different settings than the checkpoint", str(ckpt_path))
        trainer.load_state_dict(saved, ckpt_path)
        ckpt_mod.set_rng_state(saved["rng"], ckpt_path)

    def save_checkpoint():
        st = trainer.state_dict()
        st["config"] = run_id
        ckpt_mod.save(ckpt_path, st)

    out.mkdir(parents=True, exist_ok=True)
    echo(f"training {arch}: {epochs} epochs x {trainer.steps_per_epoch} steps, l-inf eps {eps_v:g}, "
         f"theta {3 * eps_v:g}, device {dev}")
    done = 0
    with catch_signals(trainer):
        while trainer.epoch < epochs:
            with progress_bar(trainer.steps_per_epoch, f"epoch {trainer.epoch + 1}/{epochs}", quiet) as adv:
                rec = trainer.train_epoch(adv, save_checkpoint)
            rec["p_end"] = net.p
            save_checkpoint()
            echo(f"epoch {rec['epoch']}/{epochs}: loss {rec['loss']:.4f}, train acc {100 * rec['train_accuracy']:.1f}% "
                 f"certified {100 * rec['train_vra_estimate']:.1f}% (p = {net.p:g}), {rec['time_s']:.1f}s")
            done += 1
            if stop_after_epochs is not None and done >= stop_after_epochs and trainer.epoch < epochs:
                raise Interrupted(0)
    # -- sound evaluation: p = inf, evaluation mode ------------------------------------------------------
    net.set_p(math.inf)
    net.eval()
    cpu = net.cpu().float()
    lm = lipverify.load(cpu, input_shape=shape)
    t0 = time.perf_counter()
    after = report.sound_evaluation(lm, eds.x, eds.y, [eps_v], norm="inf")
    sd = report.state_dict_bytes(cpu)
    builder = ("from lipverify.models.linf_dist import LinfDistNet\n\n\ndef build():\n"
               f"    return LinfDistNet({int(torch.Size(shape).numel())}, {depth}, {width}, {n_classes})\n")
    files = {"model.pt": sd, "arch.py": builder.encode()}
    rep = {"tool": "lipverify train", "architecture": {"name": arch, "family": "linf-dist", "depth": depth,
                                                        "width": width, "input_shape": list(shape),
                                                        "classes": n_classes},
           "eps": eps_v, "norm": "inf", "after": report.public(after), "history": trainer.history,
           "train_time_s": sum(h["time_s"] for h in trainer.history), "eval_time_s": time.perf_counter() - t0,
           "outputs": {"model.pt": "state dict; lipverify certify model.pt --arch arch.py:build --input-shape "
                                   + ",".join(map(str, shape)) + " --norm inf", "arch.py": "the builder"},
           "certified_by": "margin > 2 eps (every layer 1-Lipschitz in l-inf, p = inf, evaluation mode)"}
    files["report.json"] = json.dumps(finite_json(rep), indent=2, default=str, allow_nan=False).encode()
    with staged_outputs(out, last="report.json") as stage:  # together or not at all
        for name, data in files.items():
            (stage / name).write_bytes(data)
    key = repr_eps(eps_v)
    rep["_table"] = (f"clean accuracy {100 * after['clean_accuracy']:.1f}%, certified (l-inf, eps {key}) "
                     f"{100 * after['vra'][key]:.1f}% on {after['n']} inputs")
    return rep
