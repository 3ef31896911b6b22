"""Guards of a fine-tuning run: the divergence / collapse detector, the best-epoch ranking, the
hopeless-eps check and the seeded ``--limit`` subset.

Fine-tuning a normally trained deep network (a global bound of 1e8 .. 1e26) for certified robustness
can blow up: the loss is roughly ``eps * K``, its gradients are huge, and a few steps can push the
network to predicting one class.  :mod:`lipverify.train.loop` clips the global gradient norm and skips
steps whose loss or gradient is not finite; this module decides, after each epoch, whether the run
diverged (:func:`divergence_reason`), which epoch is the best so far (:func:`better`), and whether the
starting bound makes the target radius hopeless (:func:`hopeless_eps`).

Thresholds (module constants, chosen to be loose enough never to fire on a healthy run):

* chance level: ``max(1 / m, frequency of the most common label)`` (predicting one class);
* collapsed: accuracy ``<= chance + min(0.05, max(0.5 * chance, 0.02))``, after having started at least
  ``0.1`` above that line (a network trained from scratch starts at chance: never "collapsed");
* exploded: epoch loss not finite, more than half of the epoch's steps skipped (non-finite loss or
  gradient), or a loss above :data:`EXPLODE_LOSS` that is also :data:`EXPLODE_FACTOR` times the
  smallest loss of the earlier epochs.  The first epoch's loss alone is never called an explosion: a
  huge starting bound legitimately gives losses of ``eps * K`` ~ 1e8 and more.
"""

from __future__ import annotations

import math

import torch

#: default global gradient-norm clip of ``finetune`` (``--grad-clip``; 0 disables): far above the norms of a
#: healthy run (5-55 measured fine-tuning kw_mnist with GloRo; a clip of 10 clipped every step and cost VRA),
#: far below the 1e8+ of a network whose bound is 1e8+
DEFAULT_GRAD_CLIP = 1000.0
#: an epoch loss above this (and EXPLODE_FACTOR x the best earlier one) is an explosion
EXPLODE_LOSS = 1e6
EXPLODE_FACTOR = 100.0
#: how far above the collapse line the run must have started to call a fall to chance a collapse
CLEARLY_ABOVE = 0.1
#: consecutive skipped (non-finite) steps after which the epoch is abandoned
MAX_CONSECUTIVE_SKIPS = 20
#: median margin / (eps K) below this: the eps is hopeless for the starting bound
HOPELESS_RATIO = 1e-3


def chance_level(n_classes: int, *label_sets) -> float:
    """Accuracy of the best constant prediction: ``max(1/m, largest label frequency)``."""
    c = 1.0 / max(int(n_classes), 1)
    for y in label_sets:
        if y is not None and len(y):
            counts = torch.bincount(torch.as_tensor(y).reshape(-1).long().cpu())
            c = max(c, float(counts.max()) / len(y))
    return c


def collapse_line(chance: float) -> float:
    """Accuracy at or below which a run counts as collapsed to chance."""
    return chance + min(0.05, max(0.5 * chance, 0.02))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def divergence_reason(rec: dict, earlier: list[dict], start_accuracy: float | None, chance: float) -> str | None:
    """Why the epoch ``rec`` (a :class:`~lipverify.train.loop.Trainer` history record) shows a diverged
    run, or ``None``.  ``earlier``: the records before it; ``start_accuracy``: the clean accuracy of the
    input model (``None`` if unknown); ``chance``: :func:`chance_level`."""
    e = rec.get("epoch")
    loss = rec.get("loss")
    skipped, steps = int(rec.get("skipped_steps", 0) or 0), int(rec.get("steps", 0) or 0)
    if rec.get("aborted_nonfinite"):
        return (f"epoch {e}: {MAX_CONSECUTIVE_SKIPS} steps in a row had a non-finite loss or gradient "
                f"({skipped} skipped in all)")
    if steps and skipped * 2 > steps:
        return f"epoch {e}: {skipped} of {steps} steps had a non-finite loss or gradient (skipped)"
    if not _finite(loss):
        return f"epoch {e}: the training loss is not finite"
    # the warm-start epochs train another loss (CE + w log K): not comparable with the certified one
    prev = [h["loss"] for h in earlier if _finite(h.get("loss")) and bool(h.get("warm_start")) == bool(rec.get("warm_start"))]
    if prev and loss > EXPLODE_LOSS and loss > EXPLODE_FACTOR * min(prev):
        return f"epoch {e}: the training loss exploded to {loss:.3g} (it was {min(prev):.3g})"
    line = collapse_line(chance)
    ref = [a for a in [start_accuracy] + [h.get("eval_accuracy_estimate") for h in earlier]
           + [h.get("train_accuracy") for h in earlier] if _finite(a)]
    if ref and max(ref) >= line + CLEARLY_ABOVE:
        for key, what in (("eval_accuracy_estimate", "evaluation"), ("train_accuracy", "training")):
            a = rec.get(key)
            if _finite(a) and a <= line:
                return (f"epoch {e}: the {what} accuracy fell to {100 * a:.1f}% (chance level {100 * chance:.1f}%; "
                        f"it started at {100 * max(ref):.1f}%)")
    return None


def score(rec: dict) -> tuple | None:
    """Ranking key of an epoch: (eval VRA estimate, eval accuracy estimate); ``None`` without them."""
    v, a = rec.get("eval_vra_estimate"), rec.get("eval_accuracy_estimate")
    if not (_finite(v) and _finite(a)):
        return None
    return (float(v), float(a))


def better(new: tuple | None, old: tuple | None) -> bool:
    """Strictly better: a higher VRA estimate, or the same one and a higher accuracy."""
    if new is None:
        return False
    return old is None or tuple(new) > tuple(old)


def hopeless_eps(before: dict, eps: float) -> dict | None:
    """From a :func:`~lipverify.train.report.sound_evaluation` result (with its per-input ``_radii`` and
    ``_correct``): the fraction of correctly classified inputs certified at ``eps`` and the median of
    ``radius / eps`` over them (the certified radius is margin / K, so this is the median
    ``margin / (eps K)``: the factor by which the bound is too large for the median input).  ``None``
    when there is no correctly classified input."""
    radii, correct = before.get("_radii"), before.get("_correct")
    if not radii or not correct:
        return None
    r = torch.tensor([float(v) if _finite(v) else 0.0 for v, c in zip(radii, correct) if c], dtype=torch.float64)
    if not len(r):
        return None
    ratio = float(r.median()) / float(eps)
    return {"median_margin_over_eps_k": ratio, "fraction_certified": float((r >= eps).double().mean()),
            "max_margin_constant": before.get("max_margin_constant"), "hopeless": ratio < HOPELESS_RATIO}


def hopeless_message(h: dict, eps: float) -> str:
    r = h["median_margin_over_eps_k"]
    factor = f"{1 / r:.3g}" if r > 0 else "infinitely many"
    k = h.get("max_margin_constant")
    k_text = f"{k:.3g}" if _finite(k) else str(k)
    return (f"the starting bound (K up to {k_text}) makes eps={eps:g} hopeless: the median margin is {factor} times "
            "too small; fine-tuning must shrink the bound by that factor first")


def random_subset_index(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """Indices of a seeded random subset of ``limit`` of ``n`` examples (sorted: the file's order is
    kept), or ``None`` when ``limit`` keeps everything."""
    if limit is None or limit >= n:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:max(int(limit), 0)].sort().values
