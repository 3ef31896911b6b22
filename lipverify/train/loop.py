"""The fine-tuning loop: batches, augmentation, steps, per-epoch estimates, checkpoints, interruption.

:class:`TrainStep` is the ``nn.Module`` that DDP wraps: one call runs the power-iteration update of the
bound's vectors (buffers, so DDP keeps them identical across ranks), the network forward pass (under
autocast when mixed precision is on; the bound itself is always float32 outside autocast) and the
loss.  :class:`Trainer` owns the optimiser (Adam), the learning-rate schedule (linear warm-up, cosine
decay; stepped per batch), the eps / TRADES-lambda schedules and the data order.

Determinism: the order of the training set in epoch ``e`` is ``randperm(N)`` from a generator seeded by
``(seed, e)``; the augmentation of step ``s`` comes from a generator seeded by ``(seed, e, s)`` and is drawn
for the whole global batch, of which each rank takes its slice.  Nothing else is random (the network
stays in eval mode: BatchNorm statistics and dropout are frozen), so resuming from a checkpoint written
mid-epoch or at an epoch boundary reproduces an uninterrupted run exactly on the same device.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from lipverify.train.losses import LOSSES, gloro_predict, robust_loss, warm_start_loss
from lipverify.train.recipe import MAX_CONSECUTIVE_SKIPS
from lipverify.train.schedules import EpsSchedule, LinearRamp, lr_factor


@dataclass
class TrainConfig:
    loss: str = "gloro"
    eps: float = 0.3
    eps_mult: float = 1.0
    eps_schedule: str = "log"
    eps_ramp: float | None = None  # epochs; default: half of the run
    trades_lambda: str = "1.0"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    warmup: float | None = None  # epochs; default: 5% of the run, at most 2 epochs
    min_lr_factor: float = 0.0
    weight_decay: float = 0.0
    power_iters: int = 2
    seed: int = 0
    augment: tuple = ()
    amp: bool = False
    sparsity_weight: float = 0.01
    norm: str = "2"
    grad_clip: float = 0.0  # global gradient-norm clip (0: none); finetune's default is recipe.DEFAULT_GRAD_CLIP
    warm_start: float = 0.0  # epochs of CE + warm_weight * log(max K) before the certified loss (0: none)
    warm_weight: float = 0.1

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}")
        self.augment = tuple(self.augment)

    @property
    def ramp(self) -> float:
        return self.epochs / 2 if self.eps_ramp is None else float(self.eps_ramp)

    @property
    def warmup_epochs(self) -> float:
        return min(2.0, 0.05 * self.epochs) if self.warmup is None else float(self.warmup)

    def eps_at(self) -> EpsSchedule:
        return EpsSchedule(self.eps, self.eps_schedule, self.eps_mult, self.ramp)

    def in_warm_start(self, t: float) -> bool:
        return self.loss != "local" and t < float(self.warm_start or 0.0)

    def robust_t(self, t: float) -> float:
        """Progress of the certified phase: the eps (and TRADES) schedules start after the warm start."""
        return max(t - float(self.warm_start or 0.0), 0.0) if self.loss != "local" else t

    def lam_at(self) -> LinearRamp:
        return LinearRamp.parse(self.trades_lambda)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = list(self.augment)
        return d


class _LRLambda:
    """Picklable per-step learning-rate factor (LambdaLR keeps its ``__dict__`` in its state dict)."""

    def __init__(self, steps_per_epoch: int, epochs: float, warmup: float, min_factor: float):
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.warmup = warmup
        self.min_factor = min_factor

    def __call__(self, step: int) -> float:
        return lr_factor(step / self.steps_per_epoch, self.epochs, self.warmup, self.min_factor)


class TrainStep(nn.Module):
    """One differentiable training step (the module DDP wraps)."""

    def __init__(self, bound, cfg: TrainConfig, local=None):
        super().__init__()
        self.bound = bound
        self.local = local
        self.cfg = cfg

    def forward(self, x, y, eps: float, lam: float, idx=None, ctx=None, warm: float = 0.0):
        self.bound.power_step()
        if self.cfg.loss == "local":
            loss, logits, Ky, sp = self.local(x, y, eps, idx, ctx)
            with torch.no_grad():
                K = self.bound.margin_constants()
            return loss, logits.detach(), K
        dev = x.device.type
        amp = self.cfg.amp
        ctxm = (torch.autocast(dev, dtype=torch.bfloat16 if dev == "cpu" else torch.float16)
                if amp else contextlib.nullcontext())
        with ctxm:
            logits = self.bound(x)
        logits = logits.float()
        K = self.bound.margin_constants()  # float32, never under autocast
        if warm > 0:
            loss = warm_start_loss(logits, y, K, warm)
        else:
            loss = robust_loss(self.cfg.loss, logits, y, K, eps, lam)
        return loss, logits.detach(), K.detach()


def augment_batch(x: torch.Tensor, kinds: tuple, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``P`` pixels, ``crop:P``, default ``max(1, H // 8)``, then a crop back to
    H x W) and/or horizontal flip; ``gen`` draws the offsets and flips."""
    if not kinds:
        return x
    B = x.shape[0]
    crop = [k for k in kinds if k == "crop" or k.startswith("crop:")]
    if crop:
        C, H, W = x.shape[1:]
        p = int(crop[0][5:]) if ":" in crop[0] else max(1, H // 8)
        off = torch.randint(0, 2 * p + 1, (B, 2), generator=gen).to(x.device)
        xp = torch.nn.functional.pad(x, (p, p, p, p))
        rows = off[:, 0:1] + torch.arange(H, device=x.device)[None]
        cols = off[:, 1:2] + torch.arange(W, device=x.device)[None]
        bi = torch.arange(B, device=x.device)[:, None, None, None]
        ci = torch.arange(C, device=x.device)[None, :, None, None]
        x = xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
    if "flip" in kinds:
        f = (torch.rand(B, generator=gen) < 0.5).to(x.device)
        x = torch.where(f.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def catch_signals(trainer: "Trainer"):
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the next step boundary and stops."""
    from lipverify.data.atomic import signal_handlers

    def handler(signum, frame):
        trainer.stop_signal = signum

    with signal_handlers(("SIGINT", "SIGTERM"), handler):
        yield


@dataclass
class EpochStats:
    loss: float = 0.0
    correct: float = 0.0
    cert: float = 0.0
    n: float = 0.0
    sparsity: float = 0.0
    skipped: float = 0.0  # steps not taken: non-finite loss or gradient
    run: float = 0.0  # consecutive skipped steps at the end so far
    clipped: float = 0.0  # steps whose gradient norm was clipped
    gnorm_max: float = 0.0  # largest finite gradient norm (before clipping)
    gnorm_log: float = 0.0  # sum of log10 of the finite gradient norms (their geometric mean)

    def tensor(self, device):
        return torch.tensor([self.loss, self.correct, self.cert, self.n, self.sparsity], dtype=torch.float64,
                            device=device)


@dataclass
class Trainer:
    step_module: nn.Module  # TrainStep or DDP(TrainStep)
    train_x: torch.Tensor
    train_y: torch.Tensor
    cfg: TrainConfig
    ctx: object  # DistContext
    eval_x: torch.Tensor | None = None
    eval_y: torch.Tensor | None = None
    history: list = field(default_factory=list)
    epoch: int = 0
    step: int = 0  # steps done inside the current epoch
    partial: dict = field(default_factory=dict)
    stop_signal: int | None = None
    #: the best epoch so far (rank 0): {"epoch", "score": [vra, acc] or None, "state": CPU state dict}
    best: dict | None = None

    def __post_init__(self):
        self.inner = getattr(self.step_module, "module", self.step_module)
        params = [p for p in self.inner.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        B = self.cfg.batch_size
        N = len(self.train_y)
        if B % self.ctx.world:
            from lipverify.errors import UserInputError

            raise UserInputError(f"--batch-size {B} must be a multiple of the number of processes ({self.ctx.world})")
        self.global_batch = min(B, N - N % self.ctx.world) if N >= self.ctx.world else N
        self.steps_per_epoch = max(1, N // self.global_batch)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, _LRLambda(self.steps_per_epoch, self.cfg.epochs, self.cfg.warmup_epochs, self.cfg.min_lr_factor))
        self.scaler = (torch.amp.GradScaler("cuda") if self.cfg.amp and self.train_x.device.type == "cuda" else None)
        self.eps_sched = self.cfg.eps_at()
        self.lam_sched = self.cfg.lam_at()

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        st = {"train_state": self.inner.state_dict(), "optimizer": self.opt.state_dict(),
              "scheduler": self.sched.state_dict(), "epoch": self.epoch, "step": self.step,
              "history": list(self.history), "partial": dict(self.partial)}
        if self.scaler is not None:
            st["scaler"] = self.scaler.state_dict()
        if self.inner.local is not None:
            st["local_vectors"] = self.inner.local.vector_state()
        if self.best is not None:
            st["best"] = self.best
        return st

    def load_state_dict(self, st: dict, path=None) -> None:
        """Restore a checkpoint's state (:func:`lipverify.train.checkpoint.load` read it weights-only).

        Warnings
        --------
        An entry missing or of the wrong shape (a damaged or edited checkpoint) raises
        :class:`~lipverify.errors.UserInputError` (exit 2, one line) instead of a traceback.
        """
        try:
            self._load_state_dict(st)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            from lipverify.errors import UserInputError

            text = str(exc).strip().splitlines()
            raise UserInputError("the checkpoint does not fit this run (damaged, or written for another network): "
                                 f"{type(exc).__name__}: {text[0][:200] if text else ''}",
                                 None if path is None else str(path)) from None

    def _load_state_dict(self, st: dict) -> None:
        self.inner.load_state_dict(st["train_state"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.epoch, self.step = int(st["epoch"]), int(st["step"])
        self.history = list(st["history"])
        self.partial = dict(st.get("partial") or {})
        if self.scaler is not None and "scaler" in st:
            self.scaler.load_state_dict(st["scaler"])
        if self.inner.local is not None and "local_vectors" in st:
            self.inner.local.load_vector_state(st["local_vectors"])
        best = st.get("best")
        if best is not None:
            best = {"epoch": int(best["epoch"]), "score": None if best.get("score") is None else
                    [float(v) for v in best["score"]], "state": dict(best["state"])}
        self.best = best

    # -- batches --------------------------------------------------------------------------------------
    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_y), generator=g)

    def _batch(self, perm, epoch, step):
        gb = self.global_batch
        idx = perm[step * gb:(step + 1) * gb]
        g = torch.Generator().manual_seed(((self.cfg.seed * 1_000_003 + epoch) * 100_003 + step) % (2 ** 63))
        x = self.train_x[idx.to(self.train_x.device)]
        x = augment_batch(x, self.cfg.augment, g)
        per = gb // self.ctx.world
        sl = slice(self.ctx.rank * per, (self.ctx.rank + 1) * per)
        ridx = idx[sl].to(self.train_x.device)
        return x[sl], self.train_y[ridx], ridx

    def progress_t(self, epoch: int, step: int) -> float:
        return epoch + step / self.steps_per_epoch

    # -- loop -----------------------------------------------------------------------------------------
    def train_epoch(self, progress=None, save_fn=None) -> dict:
        e = self.epoch
        perm = self._perm(e)
        aborted = False
        st = EpochStats(**{k: v for k, v in self.partial.items() if not k.startswith("_")})
        t_start = time.perf_counter() - float(self.partial.get("_time", 0.0))
        test_eps = self.cfg.eps
        while self.step < self.steps_per_epoch:
            s = self.step
            x, y, idx = self._batch(perm, e, s)
            t = self.progress_t(e, s)
            if hasattr(self.inner, "set_progress"):  # schedules inside the model (l-inf distance nets' p)
                self.inner.set_progress(t)
            eps_t = self.eps_sched(self.cfg.robust_t(t))
            lam_t = self.lam_sched(self.cfg.robust_t(t))
            warm = float(self.cfg.warm_weight) if self.cfg.in_warm_start(t) else 0.0
            loss, logits, K = self.step_module(x, y, eps_t, lam_t, idx, self.ctx if self.ctx.enabled else None,
                                               **({"warm": warm} if warm else {}))
            taken, clipped, gnorm = self._optimizer_step(loss)
            with warnings.catch_warnings():  # a skipped step leaves the optimiser unstepped: expected
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                self.sched.step()
            with torch.no_grad():
                b = len(y)
                if taken:
                    st.loss += float(loss) * b
                    st.run = 0.0
                else:
                    st.skipped += 1
                    st.run += 1
                st.clipped += float(clipped)
                if taken and gnorm > 0:
                    st.gnorm_max = max(st.gnorm_max, gnorm)
                    st.gnorm_log += math.log10(gnorm)
                st.correct += float((logits.argmax(1) == y).sum())
                st.cert += float((gloro_predict(logits, K, test_eps) == y).sum())
                st.n += b
            self.step += 1
            if st.run >= MAX_CONSECUTIVE_SKIPS:  # the same on every rank: the skip decision is all-reduced
                aborted = True
                break
            if progress is not None:
                progress(1)
            if self._should_stop():
                self.partial = {**asdict(st), "_time": time.perf_counter() - t_start}
                if save_fn is not None:
                    save_fn()
                raise Interrupted(int(self.stop_signal or signal.SIGTERM))
        tot = self.ctx.all_reduce_sum(st.tensor(torch.device("cpu") if not self.ctx.enabled or
                                                 self.train_x.device.type == "cpu" else self.train_x.device)).cpu()
        loss_sum, correct, cert, n, _ = tot.tolist()
        self.inner.bound.converge(tol=1e-5, max_iter=100)
        n_taken = n - st.skipped * (n / max(self.step, 1))  # examples of the steps taken (equal batches)
        rec = {"epoch": e + 1, "loss": loss_sum / n_taken if n_taken > 0 else float("nan"),
               "train_accuracy": correct / max(n, 1),
               "steps": self.step, "skipped_steps": int(st.skipped), "clipped_steps": int(st.clipped),
               "grad_norm_max": st.gnorm_max,
               "grad_norm_geomean": 10 ** (st.gnorm_log / (self.step - st.skipped)) if self.step > st.skipped else None,
               "train_vra_estimate": cert / max(n, 1),
               "eps_train": self.eps_sched(self.cfg.robust_t(self.progress_t(e, self.steps_per_epoch))),
               "warm_start": self.cfg.in_warm_start(self.progress_t(e, self.steps_per_epoch - 1)),
               "lr": self.opt.param_groups[0]["lr"], "global_bound_estimate": self.inner.bound.global_estimate()}
        if self.ctx.enabled:
            rec["rank_divergence"] = self._rank_divergence()
            if rec["rank_divergence"] != 0.0:
                from lipverify.errors import LipverifyError

                raise LipverifyError(f"internal error: DDP ranks diverged by {rec['rank_divergence']:.3g}")
        if self.eval_x is not None and self.ctx.is_main:
            rec.update(self.evaluate_estimate(self.eval_x, self.eval_y))
        if aborted:
            rec["aborted_nonfinite"] = True
        rec["time_s"] = time.perf_counter() - t_start
        self.history.append(rec)
        self.epoch += 1
        self.step = 0
        self.partial = {}
        return rec

    def _optimizer_step(self, loss: torch.Tensor) -> tuple[bool, bool, float]:
        """Backward, clip the global gradient norm to ``cfg.grad_clip`` (after unscaling under AMP) and
        step -- unless the loss or the gradient is not finite on any rank: then no update at all (the
        learning-rate schedule still advances).  Returns (step taken, gradient clipped, gradient norm before
        clipping)."""
        self.opt.zero_grad(set_to_none=True)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        with torch.no_grad():
            norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                    if grads else torch.zeros((), device=loss.device))
            bad = torch.stack([(~torch.isfinite(loss.detach().float())).float(),
                               (~torch.isfinite(norm)).float()]).max().reshape(1)
            if self.ctx.enabled:  # every rank skips the same steps (DDP keeps the weights identical)
                if self.train_x.device.type != "cpu":
                    bad = bad.to(self.train_x.device)
                self.ctx.all_reduce_max(bad)
            skip = float(bad) > 0
            clip = float(self.cfg.grad_clip or 0.0)
            clipped = (not skip) and clip > 0 and float(norm) > clip
            if clipped:
                scale = clip / (float(norm) + 1e-6)
                for g in grads:
                    g.mul_(scale)
        if self.scaler is not None:
            if skip:  # no step; update() still adjusts the scale from the inf checks unscale_ recorded
                self.opt.zero_grad(set_to_none=True)
                if grads:
                    self.scaler.update()
                return False, False, 0.0
            self.scaler.step(self.opt)
            self.scaler.update()
            return not skip, clipped, float(norm)
        if not skip:
            self.opt.step()
        else:
            self.opt.zero_grad(set_to_none=True)
        return not skip, clipped, (0.0 if skip else float(norm))

    # -- best epoch ---------------------------------------------------------------------------------------
    def trainable_state(self) -> dict:
        """A CPU copy of the trained module's state dict (weights and power-iteration vectors)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.inner.state_dict().items()}

    def snapshot_start(self) -> None:
        """Keep the starting state as the fallback 'best' (epoch 0, no score): any scored epoch that is not
        discarded as diverged replaces it."""
        if self.best is None:
            self.best = {"epoch": self.epoch, "score": None, "state": self.trainable_state()}

    def consider_best(self, rec: dict) -> bool:
        """Keep the state after epoch ``rec`` if its (eval VRA, eval accuracy) estimate is at least as good
        as the best so far (a tie goes to the later, more trained epoch).  Returns whether it was kept."""
        from lipverify.train.recipe import better, score

        sc = score(rec)
        old = None if self.best is None else self.best.get("score")
        if sc is None or (old is not None and better(old, sc)):  # a tie goes to the later epoch
            return False
        self.best = {"epoch": int(rec["epoch"]), "score": list(sc), "state": self.trainable_state()}
        return True

    def restore_best(self) -> int | None:
        """Load the best state into the trained module if it is not the current one; returns its epoch
        (``None`` when nothing was restored)."""
        if self.best is None or self.best["epoch"] == self.epoch:
            return None
        self.inner.load_state_dict(self.best["state"])
        return int(self.best["epoch"])

    @torch.no_grad()
    def _rank_divergence(self) -> float:
        """Largest difference between this rank's power-iteration vectors / weight checksums and rank
        0's, over all ranks (must be exactly 0: DDP keeps them identical)."""
        import torch.distributed as dist

        parts = [b.detach().double().flatten() for n, b in self.inner.bound.named_buffers() if n.startswith("u")]
        parts += [p.detach().double().pow(2).sum().view(1) for p in self.inner.parameters()]
        flat = torch.cat(parts)
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        d = (flat - ref).abs().max().view(1)
        self.ctx.all_reduce_max(d)
        return float(d)

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal else 0.0])
        if self.ctx.enabled:
            if self.train_x.device.type != "cpu":
                flag = flag.to(self.train_x.device)
            self.ctx.all_reduce_max(flag)
        if float(flag) > 0 and not self.stop_signal:
            self.stop_signal = signal.SIGTERM
        return float(flag) > 0

    @torch.no_grad()
    def evaluate_estimate(self, x, y, batch: int = 1024) -> dict:
        """Clean accuracy and VRA at the test eps with the training-time bound (an estimate)."""
        bound = self.inner.bound
        K = bound.margin_constants().detach()
        correct = cert = 0
        for s in range(0, len(y), batch):
            lg = bound(x[s:s + batch]).float()
            yy = y[s:s + batch]
            correct += int((lg.argmax(1) == yy).sum())
            cert += int((gloro_predict(lg, K, self.cfg.eps) == yy).sum())
        n = max(len(y), 1)
        return {"eval_accuracy_estimate": correct / n, "eval_vra_estimate": cert / n}


def finite_or_none(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None
