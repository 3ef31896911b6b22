"""How much of each audit step fits a time budget (``lipverify audit --time-budget``).

The costly steps of an audit are gradient work on the model: attacks, optimised lower bounds and local
certification.  Their cost is predicted from one measured number, ``t_fb``: the seconds of one
forward-and-backward pass per input at the audit's batch size, times the number of such passes each
step makes per input (counted from the attack presets in :mod:`lipverify.attacks.strength`):

* an attack preset ``s`` with ``E`` radii makes ``minnorm(s) + E * ensemble(s)`` passes per input;
* the margin lower bound makes ``seeds * restarts * pairs * steps`` passes, the Jacobian lower bound
  ``seeds * restarts * (iters + steps * (1 + max(2, iters // 5)))``;
* local certification is timed as it runs, one input at a time, and stops at its share.

The planner chooses the strongest attack preset whose predicted cost fits the attack's share, scales
the fastest preset's step counts down when even it does not fit (to at least :data:`MIN_SCALE`), and
reduces the number of inputs only when that is still too much.  Every reduction is returned as a note
that the report prints, with the option that undoes it.

Warnings
--------
The prediction is an extrapolation from a short measurement: on a machine whose load changes, a step
may take longer or shorter than planned (the report gives planned and measured seconds per step).
A budget changes results only by choosing less work: a reduced attack finds fewer or larger
adversarial examples (weaker upper bounds on the robust radius), never a wrong one, and certificates
are sound whichever subset of inputs gets the local ones.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

from lipverify.attacks.strength import Strength, get_strength

#: weakest scaling of the ``fast`` preset's step counts before inputs are dropped instead
MIN_SCALE = 0.2
#: share of the budget left after the bounds and the global certificates, per optional step
SHARES = {"attack": 0.45, "lower": 0.2, "local": 0.3, "lipsdp": 0.05}
#: fewest inputs an audit keeps when the budget is tight
MIN_INPUTS = 10
#: presets from the strongest down
ORDER = ("thorough", "standard", "fast")


def minnorm_passes(st: Strength, norm: str) -> float:
    """Forward-and-backward passes per input of the minimum-norm escalation."""
    p = st.fmn_steps * (1 + st.fmn_targets) * (2 if norm == "inf" else 1)
    p += st.fab_steps * st.fab_targets * max(st.fab_restarts, 1) if st.fab_steps else 0
    p += st.ddn_steps if norm == "2" else 0
    p += st.bisect_steps * st.bisect_restarts * (st.bisect_iters + 2)
    return float(p)


def ensemble_passes(st: Strength) -> float:
    """Forward-and-backward passes per input of the fixed-eps ensemble, for one eps."""
    p = st.apgd_steps * (st.apgd_ce_restarts + st.apgd_targets * st.apgd_target_restarts)
    p += st.fab_steps * st.ensemble_fab_targets if st.fab_steps else 0
    p += st.apgd_steps * max(2, st.bisect_restarts)
    return float(p)


def attack_passes(st: Strength, n_eps: int, norm: str) -> float:
    """Passes per input of :func:`lipverify.attacks.evaluate.evaluate_robustness` (an upper estimate:
    the ensemble runs only on the inputs the minimum-norm stage left unbroken at each eps)."""
    return minnorm_passes(st, norm) + n_eps * ensemble_passes(st)


def scaled(st: Strength, factor: float) -> Strength:
    """``st`` with every step count times ``factor`` (targets and restarts unchanged), named e.g.
    ``fast x0.40``."""
    def k(v: int) -> int:
        return max(5, int(round(v * factor))) if v else 0

    return replace(st, name=f"{st.name} x{factor:.2f}", fmn_steps=k(st.fmn_steps), fab_steps=k(st.fab_steps),
                   ddn_steps=k(st.ddn_steps), bisect_steps=k(st.bisect_steps), apgd_steps=k(st.apgd_steps))


def measure_pass(forward, x: torch.Tensor, batch: int = 64, repeats: int = 2) -> float:
    """Seconds of one forward-and-backward pass per input (median of ``repeats`` after a warm-up) on
    the first ``batch`` inputs of ``x``."""
    xb = x[:batch].detach().clone().requires_grad_(True)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        out = forward(xb)
        (g,) = torch.autograd.grad(out.reshape(len(xb), -1).sum(), xb)
        del g
        if r:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] / max(len(xb), 1)


@dataclass
class Plan:
    """What an audit runs: inputs, attack preset, lower-bound sizes, local-certificate budget, and the
    notes that say what the budget reduced."""

    budget_s: float | None
    n: int
    strength: Strength
    lower_seeds: int = 32
    lower_steps: int = 150
    jac_seeds: int = 16
    jac_steps: int = 50
    local_budget_s: float | None = None
    lipsdp_budget_s: float | None = None
    t_pass: float | None = None
    predicted_s: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"budget_s": self.budget_s, "n": self.n, "strength": self.strength.name,
                "lower": {"seeds": self.lower_seeds, "steps": self.lower_steps},
                "jacobian_lower": {"seeds": self.jac_seeds, "steps": self.jac_steps},
                "local_budget_s": self.local_budget_s, "seconds_per_pass_per_input": self.t_pass,
                "predicted_s": dict(self.predicted_s)}


#: measured cost of one optimisation step of the lower bounds in forward passes of one input (a step
#: is a forward and a backward pass through a batch of start points, plus the bookkeeping; measured on
#: the built-in model and a ResNet-18 by ``benchmarks/bench_audit.py``: 2.4-2.6 and 7.4-9.5)
LOWER_STEP_PASSES = 2.5
JAC_STEP_PASSES = 8.5


#: ``--time-budget auto``: this many seconds ...
AUTO_BASE_S = 15.0
#: ... plus the time of this many forward-backward passes of one input ...
AUTO_PASSES = 100_000
#: ... at most this many seconds
AUTO_MAX_S = 150.0


def secs(v: float) -> str:
    """Seconds as the notes print them: ``0.5``, ``20.3``, ``102``."""
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def auto_budget(t_pass: float) -> float:
    """The default analysis budget: ``15 s + 100000 * t_pass``, at most 150 s (about 20 s for a small
    MNIST network, about 2 minutes for a ResNet-18 on a laptop CPU)."""
    return min(AUTO_BASE_S + AUTO_PASSES * float(t_pass), AUTO_MAX_S)


def lower_passes(seeds: int, steps: int, restarts: int = 2, pairs: int = 3) -> float:
    return LOWER_STEP_PASSES * seeds * restarts * pairs * steps


def jac_passes(seeds: int, steps: int, iters: int = 30, restarts: int = 2) -> float:
    return JAC_STEP_PASSES * seeds * restarts * (iters + steps * (1 + max(2, iters // 5)))


def plan(n: int, n_eps: int, norm: str, strength, steps: set, budget_s: float | None, t_pass: float | None,
         spent_s: float = 0.0) -> Plan:
    """The plan for ``n`` inputs given the seconds already spent (bounds, global certificates).

    ``strength``: a preset name, a :class:`Strength`, or ``"auto"`` (the strongest preset that fits;
    ``standard`` without a budget).  ``budget_s`` None: no limit (everything as asked)."""
    auto = strength == "auto"
    st = get_strength("standard" if auto else strength)
    p = Plan(budget_s, n, st, t_pass=t_pass)
    if budget_s is None or t_pass is None:
        return p
    left = max(budget_s - spent_s, 0.0)
    on = [s for s in SHARES if s in steps]
    total_share = sum(SHARES[s] for s in on) or 1.0
    share = {s: left * SHARES[s] / total_share for s in on}
    undo = "--time-budget none runs everything as asked"
    if "attack" in share:
        a = share["attack"]

        def cost(s: Strength, k: int) -> float:
            return attack_passes(s, n_eps, norm) * k * t_pass

        candidates = [get_strength(name) for name in ORDER] if auto else \
            [get_strength(name) for name in ORDER[ORDER.index(st.name):]] if st.name in ORDER else [st]
        chosen = next((c for c in candidates if cost(c, n) <= a), None)
        if chosen is None:
            base = candidates[-1]
            f = a / cost(base, n)
            if f >= MIN_SCALE:
                chosen = scaled(base, f)
            else:
                chosen = scaled(base, MIN_SCALE)
                k = max(MIN_INPUTS, int(a / cost(chosen, 1)))
                if k < n:
                    p.notes.append(f"time budget {secs(budget_s)} s: {k} of {n} inputs audited ({undo}, or lower --limit)")
                    p.n = n = k
        if chosen.name != st.name and not (auto and chosen.name == "standard"):
            p.notes.append(f"time budget {secs(budget_s)} s: attacks at strength '{chosen.name}' instead of "
                           f"'{'auto: standard' if auto else st.name}' ({undo}, or --strength)")
        elif auto:
            p.notes.append(f"attacks at strength '{chosen.name}' (the strongest preset within the time budget)")
        p.strength = chosen
        p.predicted_s["attack"] = cost(chosen, n)
    if "lower" in share:
        a = share["lower"]
        c = (lower_passes(p.lower_seeds, p.lower_steps) + (jac_passes(p.jac_seeds, p.jac_steps) if norm == "2" else 0)) * t_pass
        if c > a:
            f = max(a / c, 0.02)
            p.lower_seeds = max(2, int(round(p.lower_seeds * math.sqrt(f))))
            p.lower_steps = max(20, int(round(p.lower_steps * math.sqrt(f))))
            p.jac_seeds = max(1, int(round(p.jac_seeds * math.sqrt(f))))
            p.jac_steps = max(10, int(round(p.jac_steps * math.sqrt(f))))
            p.notes.append(f"time budget {secs(budget_s)} s: lower bounds from {p.lower_seeds} start points x "
                           f"{p.lower_steps} steps instead of 32 x 150 ({undo})")
        p.predicted_s["lower"] = (lower_passes(p.lower_seeds, p.lower_steps)
                                  + (jac_passes(p.jac_seeds, p.jac_steps) if norm == "2" else 0)) * t_pass
    if "local" in share:
        p.local_budget_s = share["local"]
        p.predicted_s["local"] = share["local"]
    if "lipsdp" in share:
        p.lipsdp_budget_s = share["lipsdp"]
    return p
