"""The float64 judge of adversarial points: what counts as a proof of non-robustness.

An attack runs in the model's own arithmetic (usually float32) because that is fast; the certifier
evaluates the model in float64.  A point found in float32 can sit on a float32 tie: margin ``<= 0`` in
float32 and ``+1e-7`` in float64.  Reporting its norm as ``r_adv`` would claim an adversarial example
that the certifier's arithmetic does not see.  So every point that lipverify reports is judged here:

* **misclassified, strictly**: ``max_{i != y} f_i(z) - f_y(z) > tau`` with ``f`` evaluated in float64 on
  the float64 value of ``z`` (the returned tensor, exactly representable) and
  ``tau = 1e-6 max_i |f_i(z)|``, well above float32 rounding of the logits, so that neither a
  float32 runtime nor a different batch size or BLAS kernel can turn the point back into a tie;
* **inside the box** ``lo <= z <= hi`` and, for fixed-eps attacks, **inside the ball**
  ``||z - x||_p <= eps``, both checked in float64 on the returned tensor.

Points that fail are repaired where that is cheap and provable:

* a float32 tie is pushed outward along its segment, ``z_t = x + t (z - x)`` for
  ``t = 1 + 10^-7, 1 + 10^-6, ..., 2``, clipped to the box, until it is misclassified in float64 (the
  caller then bisects back towards ``x``)
  (:meth:`Judge.push_out`);
* a point outside the ball by a rounding error is moved towards ``x`` one float32 ulp at a time
  (l-inf) or rescaled by ``1 - 2^-k`` (l2) until it is inside (:meth:`Judge.snap_into_ball`).

What cannot be repaired is dropped: the caller reports "not found" for it.

Warnings
--------
The judgement is only as good as the float64 model: with a ``forward`` that is not an ``nn.Module`` and
does not accept float64 inputs, points are judged in the forward's own precision and
:attr:`Judge.precision` says so.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from lipverify.attacks.core import Forward, bcast, clip_rows, flat_norm, margin_loss

__all__ = ["Judge", "TAU", "float64_forward"]

#: relative margin a point must clear to count as misclassified
TAU = 1e-6


def float64_forward(forward: Forward, like: torch.Tensor) -> tuple[Forward, str]:
    """A float64 version of ``forward`` and the precision it really computes in.

    ``nn.Module``: a deep copy cast to float64 (eval flags kept).  Another callable: used as it is when
    it maps float64 inputs to float64 outputs; otherwise it is called in ``like``'s dtype.
    """
    if like.dtype == torch.float64:
        return forward, "float64"
    if isinstance(forward, nn.Module):
        m = copy.deepcopy(forward).to(torch.float64)
        for a, b in zip(forward.modules(), m.modules()):
            b.training = a.training
        return m, "float64"
    try:
        with torch.no_grad():
            out = forward(like[:1].to(torch.float64))
        if out.dtype == torch.float64:
            return forward, "float64"
    except (RuntimeError, TypeError):
        pass
    dt = like.dtype
    return (lambda z: forward(z.to(dt))), str(dt).replace("torch.", "")


class Judge:
    """Checks candidate adversarial points in float64 (see the module docstring).

    Parameters
    ----------
    forward:
        The model's forward pass (any dtype).
    like:
        A batch of inputs: the dtype and device of the points to judge.
    clip:
        ``None`` or a checked box ``(lo, hi)`` (floats or tensors), as from
        :func:`lipverify.attacks.core.check_clip`.
    forward64:
        Optional float64 forward pass (e.g. ``LipModel.module_double()``); built from ``forward`` if
        omitted.
    """

    def __init__(self, forward: Forward, like: torch.Tensor, clip=None, forward64: Forward | None = None):
        if forward64 is None:
            self.forward64, self.precision = float64_forward(forward, like)
        else:
            self.forward64, self.precision = forward64, "float64"
        self.clip = clip
        self.dtype = like.dtype
        self.ndim = like.dim()

    def rows(self, idx: torch.Tensor) -> "Judge":
        """The same judge for the rows ``idx`` of the batch (a per-example box is indexed with them)."""
        sub = copy.copy(self)
        sub.clip = clip_rows(self.clip, idx, self.ndim)
        return sub

    # -- basic checks ------------------------------------------------------------------------------
    def _margins(self, z: torch.Tensor, y: torch.Tensor, strict: bool, chunk: int = 1024) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for s in range(0, z.shape[0], chunk):
                lg = self.forward64(z[s:s + chunk].to(torch.float64))
                lg = lg.reshape(lg.shape[0], -1).to(torch.float64)
                m = -margin_loss(lg, y[s:s + chunk])
                out.append(m + TAU * lg.abs().amax(dim=1) if strict else m)
        if not out:
            return torch.zeros(0, dtype=torch.float64, device=z.device)
        return torch.cat(out)

    def margin(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``f_y(z) - max_{i != y} f_i(z)`` in float64 (``<= 0``: misclassified, a tie included)."""
        return self._margins(z, y, strict=False)

    def in_box(self, z: torch.Tensor) -> torch.Tensor:
        if self.clip is None:
            return torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        lo, hi = self.clip
        z64 = z.to(torch.float64)
        lo64 = lo.to(torch.float64) if isinstance(lo, torch.Tensor) else lo
        hi64 = hi.to(torch.float64) if isinstance(hi, torch.Tensor) else hi
        ok = (z64 >= lo64) & (z64 <= hi64)
        return ok.flatten(1).all(dim=1)

    @staticmethod
    def dist(z: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
        """``||z - x||_p`` in float64 (the difference of two float32 tensors is exact in float64)."""
        return flat_norm(z.to(torch.float64) - x.to(torch.float64), norm)

    def strict_margin(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The float64 margin plus ``tau = 1e-6 max |f|``: ``< 0`` means genuinely misclassified."""
        return self._margins(z, y, strict=True)

    def genuine(self, x, y, z, norm: str, eps=None) -> torch.Tensor:
        """Strictly misclassified in float64, in the box and (if ``eps``) in the ball."""
        ok = (self.strict_margin(z, y) < 0) & self.in_box(z)
        if eps is not None:
            ok &= self.dist(z, x, norm) <= eps
        return ok

    # -- repairs -----------------------------------------------------------------------------------
    def _to_box(self, z: torch.Tensor) -> torch.Tensor:
        """Clip to the box and fix float32 rounding of its ends (one ulp inwards)."""
        if self.clip is None:
            return z
        lo, hi = self.clip
        if isinstance(lo, torch.Tensor):
            z = torch.maximum(torch.minimum(z, hi.to(z.dtype)), lo.to(z.dtype))
        else:
            z = z.clamp(lo, hi)
        z64 = z.to(torch.float64)
        lo64 = lo.to(torch.float64) if isinstance(lo, torch.Tensor) else lo
        hi64 = hi.to(torch.float64) if isinstance(hi, torch.Tensor) else hi
        for _ in range(2):
            low = z64 < lo64
            high = z64 > hi64
            if not bool(low.any() or high.any()):
                break
            z = torch.where(low, torch.nextafter(z, torch.full_like(z, math.inf)), z)
            z = torch.where(high, torch.nextafter(z, torch.full_like(z, -math.inf)), z)
            z64 = z.to(torch.float64)
        return z

    def along(self, x: torch.Tensor, d64: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x + t d`` computed in float64, rounded to the attack's dtype and put in the box."""
        z = (x.to(torch.float64) + bcast(t.to(torch.float64), d64) * d64).to(self.dtype)
        return self._to_box(z)

    def push_out(self, x, y, z, norm: str, max_eps=None, factors=(1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
        """Make float32 ties genuine by moving them outward along the segment from ``x``.

        Returns ``(z, ok)``: ``ok[b]`` when ``z[b]`` is genuine (and within ``max_eps``).
        """
        z = z.clone()
        ok = self.genuine(x, y, z, norm)
        if max_eps is not None:
            ok &= self.dist(z, x, norm) <= max_eps
        todo = (~ok).nonzero().reshape(-1)
        if todo.numel() == 0:
            return z, ok
        d64 = z[todo].to(torch.float64) - x[todo].to(torch.float64)
        nz = flat_norm(d64, "inf") > 0
        for f in factors:
            if todo.numel() == 0:
                break
            t = torch.full((todo.numel(),), 1.0 + f, dtype=torch.float64, device=z.device)
            sub = self.rows(todo)
            cand = sub.along(x[todo], d64, t)
            good = sub.genuine(x[todo], y[todo], cand, norm) & nz
            if max_eps is not None:
                good &= self.dist(cand, x[todo], norm) <= max_eps
            if good.any():
                z[todo[good]] = cand[good]
                ok[todo[good]] = True
            keep = ~good
            todo, d64, nz = todo[keep], d64[keep], nz[keep]
        return z, ok

    def snap_into_ball(self, x, z, eps: torch.Tensor, norm: str, rounds: int = 8) -> torch.Tensor:
        """Move points that are outside ``||z - x||_p <= eps`` (in float64) by a rounding error back in."""
        z = z.clone()
        eps = eps.to(torch.float64)
        for k in range(rounds):
            out = self.dist(z, x, norm) > eps
            if not bool(out.any()):
                break
            idx = out.nonzero().reshape(-1)
            zi, xi = z[idx], x[idx]
            if norm == "inf":
                e = bcast(eps[idx], zi)
                bad = (zi.to(torch.float64) - xi.to(torch.float64)).abs() > e
                stepped = torch.nextafter(zi, xi)
                zi = torch.where(bad, stepped, zi)
                if k >= 3:  # far outside (not a rounding error): clamp in float64 first
                    zi = torch.where(bad, (xi.to(torch.float64) + (zi.to(torch.float64) - xi.to(torch.float64))
                                           .clamp(-e, e)).to(zi.dtype), zi)
            else:
                d64 = zi.to(torch.float64) - xi.to(torch.float64)
                r = flat_norm(d64, "2")
                scale = (eps[idx] / r.clamp_min(1e-300)).clamp_max(1.0) * (1 - 2.0 ** (-20 + 2 * k))
                zi = self.rows(idx).along(xi, d64, scale)
            z[idx] = zi
        return z
