"""Shared pieces of the attacks: norms, projections, the input box, random starts and margins.

Everything here uses only tensors and the model's forward pass; nothing imports bound code.
The margin of ``x`` for label ``y`` is ``f_y(x) - max_{i != y} f_i(x)``: a point is adversarial when it
is ``< 0`` (strictly, the rule the float64 check of :mod:`lipverify.attacks.verify` applies).
"""

from __future__ import annotations

from typing import Callable

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["Forward", "apply_clip", "bcast", "check_clip", "check_norm", "clip_rows", "flat_dual_norm",
           "flat_norm", "grad_of", "logits_of", "margin_loss", "margin_of", "per_example", "prepare",
           "project_ball", "rand_like_gen", "randn_like_gen", "random_in_ball", "ranked_targets"]


def grad_of(out: torch.Tensor, inp: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
    """``d out.sum() / d inp``; zeros when ``out`` does not depend differentiably on ``inp`` (a model with
    a non-differentiable forward gives gradient attacks nothing to follow, not an error)."""
    if not out.requires_grad:
        return torch.zeros_like(inp)
    (g,) = torch.autograd.grad(out.sum(), inp, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g


def check_norm(norm) -> str:
    s = str(norm).strip().lower()
    if s in ("2", "2.0", "l2"):
        return "2"
    if s in ("inf", "linf", "l-inf", "infinity"):
        return "inf"
    raise ValueError(f"norm must be '2' or 'inf', got {norm!r}")


def flat_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example ``||t_b||_p`` over all non-batch dimensions."""
    f = t.flatten(1)
    if norm == "2":
        return f.norm(p=2, dim=1)
    return f.abs().amax(dim=1) if f.shape[1] > 0 else f.new_zeros(f.shape[0])


def flat_dual_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example dual norm ``||t_b||_q`` (q = 2 for p = 2, q = 1 for p = inf)."""
    f = t.flatten(1)
    return f.norm(p=2, dim=1) if norm == "2" else f.abs().sum(dim=1)


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example vector ``(B,)`` to broadcast against ``like`` ``(B, ...)``."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def project_ball(delta: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Project each ``delta_b`` onto ``{||d||_p <= eps_b}``."""
    e = eps.to(delta.dtype)
    if norm == "2":
        n = flat_norm(delta, "2")
        factor = torch.where(n > e, e / n.clamp_min(torch.finfo(delta.dtype).tiny), torch.ones_like(n))
        return delta * bcast(factor, delta)
    eb = bcast(e, delta)
    return torch.maximum(torch.minimum(delta, eb), -eb)


def check_clip(clip, x: torch.Tensor):
    """``(lo, hi)`` as floats, or as tensors broadcastable to ``x`` (a per-coordinate box)."""
    if clip is None:
        return None
    lo, hi = clip
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        lo = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
        hi = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
        if bool((lo > hi).any()):
            raise ValueError("clip box has lo > hi somewhere")
        if x.numel() and (bool((x < lo - 1e-6).any()) or bool((x > hi + 1e-6).any())):
            raise ValueError("inputs lie outside the clip box")
        return lo, hi
    lo, hi = float(lo), float(hi)
    if not lo <= hi:
        raise ValueError(f"clip must be (lo, hi) with lo <= hi, got {clip!r}")
    if x.numel() and (float(x.min()) < lo - 1e-6 or float(x.max()) > hi + 1e-6):
        raise ValueError(
            f"inputs lie outside the clip box [{lo}, {hi}] (min {float(x.min())}, max {float(x.max())})"
        )
    return lo, hi


def clip_rows(clip, idx: torch.Tensor, ndim: int):
    """The box for the rows ``idx`` of a batch with ``ndim`` dimensions.

    A box of floats, or of tensors that broadcast over the batch (leading size 1, or fewer
    dimensions), is the same for every row; a per-example box (tensors ``(B, *input_shape)``, e.g. one
    VNN-LIB specification per input) is indexed like the batch, so that it stays aligned with the
    rows an attack keeps, drops or repeats.
    """
    if clip is None or not isinstance(clip[0], torch.Tensor):
        return clip
    lo, hi = clip
    if lo.dim() == ndim and lo.shape[0] > 1:
        return lo[idx], hi[idx]
    return clip


def prepare(x: torch.Tensor, y: torch.Tensor, clip):
    """Detached inputs, labels as a flat long tensor on x's device, checked clip box."""
    x = x.detach()
    B = x.shape[0]
    y = y.detach().to(device=x.device, dtype=torch.long).reshape(-1)
    if y.numel() != B:
        raise ValueError(f"y has {y.numel()} labels for {B} inputs")
    return x, y, B, check_clip(clip, x)


def apply_clip(z: torch.Tensor, clip) -> torch.Tensor:
    if clip is None:
        return z
    if isinstance(clip[0], torch.Tensor):
        return torch.maximum(torch.minimum(z, clip[1]), clip[0])
    return z.clamp(clip[0], clip[1])


def per_example(v, n: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float or a ``(n,)`` tensor as a float64 tensor of shape ``(n,)`` on ``like``'s device."""
    t = torch.as_tensor(v, dtype=torch.float64, device=like.device).detach()
    if t.dim() == 0:
        t = t.expand(n).clone()
    t = t.reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} must be a float or have one entry per example ({n}), got {t.numel()}")
    if torch.isnan(t).any() or (t < 0).any():
        raise ValueError(f"{name} must be non-negative")
    return t


def randn_like_gen(shape, like: torch.Tensor, generator) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def rand_like_gen(shape, like: torch.Tensor, generator) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def random_in_ball(like: torch.Tensor, eps: torch.Tensor, norm: str, generator) -> torch.Tensor:
    """Random points uniform in the eps-ball of each example (eps: (B,))."""
    e = bcast(eps.to(like.dtype), like)
    if norm == "inf":
        return (2 * rand_like_gen(like.shape, like, generator) - 1) * e
    d = like[0].numel()
    g = randn_like_gen(like.shape, like, generator)
    g = g / bcast(flat_norm(g, "2").clamp_min(1e-30), g)
    r = rand_like_gen((like.shape[0],), like, generator) ** (1.0 / max(d, 1))
    return g * bcast(r, g) * e


def logits_of(forward: Forward, z: torch.Tensor) -> torch.Tensor:
    out = forward(z)
    if out.dim() != 2:
        out = out.reshape(out.shape[0], -1)
    return out


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Margin loss ``max_{i != y} f_i - f_y`` per example (``>= 0`` means broken; ties count as broken).

    Parameters
    ----------
    logits: ``(B, m)`` with ``m >= 2``.
    y: ``(B,)`` integer labels.

    Returns
    -------
    ``(B,)`` tensor in the dtype of ``logits`` (differentiable).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (B, m) with m >= 2, got {tuple(logits.shape)}")
    y = y.to(device=logits.device, dtype=torch.long).reshape(-1, 1)
    f_y = logits.gather(1, y).squeeze(1)
    others = logits.scatter(1, y, float("-inf"))
    return others.amax(dim=1) - f_y


def ranked_targets(forward: Forward, x: torch.Tensor, y: torch.Tensor, norm: str,
                    max_candidates: int = 10) -> torch.Tensor:
    """Classes ordered by the distance to their linearised boundary at x (nearest first).

    For class ``i != y`` the distance is ``(f_y - f_i)^+ / ||grad(f_y - f_i)||_q`` (q the dual norm);
    it is exact for an affine model.  Only the ``max_candidates`` classes with the highest logits are
    ranked (all of them when ``m - 1 <= max_candidates``).  Returns ``(B, K)`` class indices, y excluded.
    Costs one forward and ``K`` backward passes.
    """
    xt = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        lg = logits_of(forward, xt)
        B, m = lg.shape
        K = min(m - 1, max_candidates)
        others = lg.detach().scatter(1, y.reshape(-1, 1), float("-inf"))
        cand = others.topk(K, dim=1).indices                      # (B, K)
        fy = lg.gather(1, y.reshape(-1, 1)).squeeze(1)
        dists = torch.empty((B, K), dtype=torch.float64, device=x.device)
        for c in range(K):
            d = fy - lg.gather(1, cand[:, c : c + 1]).squeeze(1)
            g = grad_of(d, xt, retain_graph=c < K - 1)
            gq = flat_dual_norm(g, norm).to(torch.float64)
            dists[:, c] = d.detach().to(torch.float64).clamp_min(0) / gq.clamp_min(1e-30)
    order = dists.argsort(dim=1, stable=True)
    return cand.gather(1, order)


def margin_of(forward: Forward, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``f_y - max_{i != y} f_i`` at z, float64, without gradients."""
    with torch.no_grad():
        return (-margin_loss(logits_of(forward, z), y)).to(torch.float64)


