"""The two-sided audit: how robust a model provably is, how robust it empirically is, and how much of
the difference is the bound's fault.

* upper side: sound global bound, LipSDP where it applies, local (IBP-masked) bounds, certified radii;
* lower side: optimised Lipschitz lower bounds (witness pairs) and adversarial radii from attacks that
  use only the forward pass;
* the soundness invariant ``r_cert(x) <= r_adv(x)`` is checked on every correctly classified input; a
  violation is a bug in lipverify and is reported first (exit code 3 in the CLI).

Steps, in the order they run (``steps`` chooses the optional ones; the first two always run):
``bounds`` (global and margin constants), ``certify`` (global certificates), ``attack`` (adversarial
radii), ``local`` (local certificates: the larger sound radius of the local constants and of CROWN where it
applies and is affordable, :func:`local_method`; and the local constants, with ``method="local"``), ``lower``
(optimised lower bounds), ``lipsdp`` (LipSDP and compositional bounds of dense chains, l2 only).
With a time budget (:mod:`lipverify.report.budget`) the optional steps get shares of it; what they leave
out is said in the notes.  After each step ``on_step`` receives the result so far (``partial=True``), so
an interrupted audit still leaves a valid report.

Warnings
--------
Local certificates within a budget are computed for the first inputs that need them only: the others
keep their global certificates (sound, smaller).  A reduced attack gives larger adversarial radii.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from lipverify.attacks.lower import (
    jacobian_spectral_lower_bound,
    margin_lipschitz_lower_bound,
)
from lipverify.bounds.crown import AFFORDABLE_UNITS
from lipverify.errors import UserInputError
from lipverify.report import budget as budget_mod
from lipverify.report import verdict as verdict_mod

#: every step, in the order they run
STEPS = ("bounds", "certify", "attack", "local", "lower", "lipsdp")


def default_eps(norm: str) -> list[float]:
    """The radii an audit reports when none are given: ``0.1, 0.3, 1`` for l2, ``1/255, 2/255, 8/255``
    for l_inf (inputs in [0, 1])."""
    return [0.1, 0.3, 1.0] if str(norm) == "2" else [1 / 255, 2 / 255, 8 / 255]


def parse_steps(text) -> list[str]:
    """``"attack,lower"`` (or a list) -> the steps to run, in order; ``bounds`` and ``certify`` always."""
    if text is None or text == "all":
        return list(STEPS)
    parts = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if str(p).strip()]
    bad = [p for p in parts if p not in STEPS]
    if bad:
        raise UserInputError(f"--steps: unknown step {bad[0]!r}; steps are {', '.join(STEPS)} (or 'all')")
    return [s for s in STEPS if s in parts or s in ("bounds", "certify")]


def parse_time_budget(text) -> float | str | None:
    """``"120"``, ``"3m"``, ``"90s"`` -> seconds; ``"none"``/``"0"`` -> None (no limit); ``"auto"`` ->
    ``"auto"`` (sized by the model's measured speed: :func:`lipverify.report.budget.auto_budget`)."""
    if text is None:
        return None
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    if isinstance(text, (int, float)):
        v = float(text)
    else:
        t = str(text).strip().lower()
        if t in ("none", "off", "unlimited", "0"):
            return None
        mult = 60.0 if t.endswith("m") or t.endswith("min") else 1.0
        t = t.removesuffix("min").removesuffix("m").removesuffix("s")
        try:
            v = float(t) * mult
        except ValueError:
            raise UserInputError(f"--time-budget must be seconds (120, 90s, 3m) or 'none', got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise UserInputError(f"--time-budget must be a finite number of seconds >= 0, got {text!r}")
    return None if v == 0 else v


@dataclass
class PairTightness:
    pair: tuple
    upper: float
    lower: float
    ratio: float
    lower_method: str


@dataclass
class AuditResult:
    model: str
    norm: str
    n: int
    eps: list
    clip: tuple | None
    bounds: dict
    global_upper: float
    lipschitz_lower: float | None
    lipschitz_lower_method: str
    lipsdp: dict | None
    local: dict | None
    pairs: list
    inputs: list  # dicts: index, label, pred, r_cert, r_adv (None: not attacked), cert_method, sound
    curves: dict  # eps grid -> clean / certified / empirical (None: not attacked)
    accuracy_at_eps: dict  # eps_key -> {certified, empirical (None: not attacked)}
    violations: list
    verdict: list
    time_s: float
    notes: list = field(default_factory=list)
    compositional: dict | None = None  # eclipse-fast / eclipse bounds of dense chains
    headline: str = ""
    steps: list = field(default_factory=list)  # the steps that ran (all of them: complete)
    partial: bool = False  # written after a step, before the audit ended
    plan: dict = field(default_factory=dict)  # what the time budget chose (see report.budget)
    step_times: dict = field(default_factory=dict)  # seconds per step
    strength: str = ""
    clean_accuracy: float = 0.0
    load_s: float | None = None  # set by the command: loading the model and the data
    total_time_s: float | None = None  # set by the command: from its start, loading included
    time_label: str = ""  # e.g. "time 95.2 s (load 6.1 s, audit 89.1 s)"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pairs"] = [asdict(p) if not isinstance(p, dict) else p for p in self.pairs]
        return _jsonable(d)

    def __repr__(self) -> str:
        return (f"AuditResult(model={self.model!r}, norm={self.norm!r}, n={self.n}, eps={self.eps}, "
                f"headline={self.headline!r}, partial={self.partial}, time_s={self.time_s:.3g})")


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, (np.floating, np.integer)):
        return _jsonable(o.item())
    return o


class _Quiet:
    """Progress that shows nothing (the default of the Python API)."""

    def stage(self, name, total, step=None, limit_s=None):
        import contextlib

        @contextlib.contextmanager
        def cm():
            yield lambda k=1: None
        return cm()

    def say(self, msg):
        pass


class _Messages(_Quiet):
    """Adapter for a ``progress(message)`` callable: one call per step."""

    def __init__(self, fn):
        self.fn = fn

    def stage(self, name, total, step=None, limit_s=None):
        self.fn(name)
        return super().stage(name, total)

    def say(self, msg):
        self.fn(msg)


def run_audit(lm, x: torch.Tensor, y: torch.Tensor, eps: list[float], norm: str = "2", clip=None,
              lower_steps: int | None = None, n_local: int = 16, strength="standard", seed: int = 0,
              progress=None, method: str = "local", steps=None, time_budget: float | None = None,
              on_step=None) -> AuditResult:
    """Run the audit (see the module docstring) and return its :class:`AuditResult`.

    ``progress``: None, a ``progress(message)`` callable, or a :class:`lipverify.report.progress.Stages`
    (a bar with an ETA per step).  ``strength``: a preset name, ``"auto"`` (the strongest that fits the
    budget) or a :class:`~lipverify.attacks.strength.Strength`.  ``time_budget``: seconds for the whole
    analysis, ``"auto"`` (sized by the model: :func:`lipverify.report.budget.auto_budget`) or None (no
    limit).  ``on_step(result)``: called after every step with the partial result.
    ``lower_steps`` overrides the lower bounds' ascent steps; ``n_local`` the inputs of the local-constant
    comparison (0: none)."""
    t0 = time.perf_counter()
    run = parse_steps(steps)
    if method == "global" and "local" in run:
        run.remove("local")
    if not eps:
        eps = []
    eps = sorted(set(float(e) for e in eps))
    prog = progress if hasattr(progress, "stage") else _Messages(progress) if callable(progress) else _Quiet()
    notes: list[str] = []
    g = torch.Generator().manual_seed(seed)
    if hasattr(prog, "names"):
        prog.names = run
    st: dict = {"steps": [], "times": {}}

    def finish_step(name, t_start):
        st["steps"].append(name)
        st["times"][name] = time.perf_counter() - t_start

    # ---- 1. bounds ------------------------------------------------------------------------------
    ts = time.perf_counter()
    with prog.stage("bounds", 1, step="bounds") as adv:
        rep = lm.bounds(norm)
        K = lm.margin_constants(norm).K
        adv(1)
    glob = rep.global_bound.value
    finish_step("bounds", ts)

    # ---- 2. global certificates -----------------------------------------------------------------
    ts = time.perf_counter()
    n = len(x)
    with prog.stage("certify (global)", max(n, 1), step="certify") as adv:
        cert = lm.certify(x, y, eps=eps, norm=norm, method="global", progress=adv)
    pred = cert.pred.cpu().numpy().astype(int) if cert.pred is not None else \
        np.array([c.pred for c in cert.inputs])
    labels = y.cpu().numpy().astype(int)
    r_cert = np.array([c.radius if c.sound else 0.0 for c in cert.inputs], dtype=float)
    cmeth = [c.method for c in cert.inputs]
    csound = [bool(c.sound) for c in cert.inputs]
    cert_at = {e: np.array([bool(c.certified_at.get(e, False)) and c.sound for c in cert.inputs]) for e in eps}
    finish_step("certify", ts)

    # ---- the plan -------------------------------------------------------------------------------
    costly = {"attack", "lower", "local"} & set(run)
    t_pass = None
    if time_budget is not None and costly and n:
        t_pass = budget_mod.measure_pass(lm.module, x.to(lm.device), batch=min(n, 64))
    if time_budget == "auto":
        time_budget = budget_mod.auto_budget(t_pass) if t_pass is not None else None
        if time_budget is not None:
            notes.append(f"time budget {budget_mod.secs(time_budget)} s (auto: sized by the model's measured speed, "
                         f"{t_pass * 1e3:.3g} ms per forward-backward pass of one input; --time-budget sets it)")
    plan = budget_mod.plan(n, len(eps), norm, strength, set(run), time_budget, t_pass,
                           spent_s=time.perf_counter() - t0)
    notes.extend(plan.notes)
    if plan.n < n:
        keep = slice(0, plan.n)
        x, y, labels, pred, r_cert = x[keep], y[keep], labels[keep], pred[keep], r_cert[keep]
        cmeth, csound = cmeth[:plan.n], csound[:plan.n]
        cert_at = {e: v[keep] for e, v in cert_at.items()}
        n = plan.n
    correct = pred == labels
    clean = float(correct.mean()) if n else 0.0

    state = {"r_adv": None, "found_by": None, "pairs": [], "jac": (None, ""), "lipsdp": None, "eclipse": None,
             "local": None, "local_cert": None, "strength": plan.strength.name if "attack" in run else ""}

    def build(partial: bool) -> AuditResult:
        r_adv = state["r_adv"]
        violations = []
        if r_adv is not None:
            # on a misclassified input r_adv is 0 (the label is already wrong) while r_cert is the radius
            # in which the (wrong) prediction cannot change: only correctly classified inputs are checked
            for i in range(n):
                if correct[i] and r_cert[i] > r_adv[i] * (1 + 1e-9) + 1e-12:
                    violations.append({"index": i, "r_cert": float(r_cert[i]), "r_adv": float(r_adv[i])})
        cert_f = verdict_mod.certified_fractions(correct, cert_at, eps)
        emp_f = verdict_mod.empirical_fractions(correct, r_adv, eps)
        finite_adv = [] if r_adv is None else [float(v) for v in r_adv if math.isfinite(v)]
        top = max([max(finite_adv, default=0.0)] + list(eps) + [float(np.max(r_cert)) if n else 0.0, 1e-6])
        grid = np.linspace(0, top * 1.05, 60)
        curves = {"eps": grid.tolist(), "clean": [clean] * len(grid),
                  "certified": [float((correct & (r_cert > e)).mean()) if n else 0.0 for e in grid],
                  "empirical": None if r_adv is None else
                  [float((correct & (r_adv > e)).mean()) if n else 0.0 for e in grid]}
        from lipverify.arguments import eps_key

        acc_eps = {eps_key(e): {"certified": cert_f[e], "empirical": None if emp_f is None else emp_f[e]}
                   for e in eps}
        fb = state["found_by"]
        inputs = [{"index": i, "label": int(labels[i]), "pred": int(pred[i]), "r_cert": float(r_cert[i]),
                   "r_adv": None if r_adv is None else float(r_adv[i]),
                   "r_adv_found_by": None if fb is None else fb[i], "cert_method": cmeth[i], "sound": csound[i]}
                  for i in range(n)]
        jac_lower, jac_method = state["jac"]
        lines = verdict_mod.verdict(norm=norm, glob=glob, lower=jac_lower, pairs=state["pairs"], r_cert=r_cert,
                                    r_adv=r_adv, correct=correct, eps=eps, cert=cert_f, emp=emp_f,
                                    violations=violations, lipsdp_info=state["lipsdp"], local_info=state["local"],
                                    eclipse_info=state["eclipse"], local_cert=state["local_cert"])
        head = verdict_mod.headline(norm, eps, cert_f, emp_f, r_cert, r_adv if r_adv is not None else None,
                                    correct, clean, n, lm.n_classes)
        if partial:
            todo = [s for s in run if s not in st["steps"]]
            head = f"(partial: {', '.join(todo)} not done yet) " + head
        pn = plan.to_dict()
        pn["n"] = n
        return AuditResult(lm.name, norm, n, list(eps), clip, rep.to_dict(), glob, jac_lower, jac_method,
                           state["lipsdp"], state["local"], list(state["pairs"]), inputs, curves, acc_eps,
                           violations, lines, time.perf_counter() - t0, notes + list(lm.notes), state["eclipse"],
                           headline=head, steps=list(st["steps"]), partial=partial, plan=pn,
                           step_times=dict(st["times"]), strength=state["strength"], clean_accuracy=clean)

    def checkpoint():
        if on_step is not None:
            on_step(build(partial=True))

    checkpoint()

    # ---- 3. attacks ------------------------------------------------------------------------------
    if "attack" in run:
        ts = time.perf_counter()
        total = n * (1 + len(eps))
        with prog.stage(f"attack ({plan.strength.name})", max(total, 1), step="attack") as adv:
            rob = lm.attack(x, y, eps=eps, norm=norm, clip=clip,
                            strength=plan.strength, seed=seed, progress=adv)
        state["r_adv"] = rob.radius.cpu().double().numpy()
        state["found_by"] = list(rob.found_by)
        notes.append(f"attacks ({plan.strength.name}): {'; '.join(rob.tried)}; every adversarial point checked "
                     f"in {rob.precision}")
        finish_step("attack", ts)
        checkpoint()

    # ---- 4. local certificates and local constants ------------------------------------------------
    if "local" in run:
        ts = time.perf_counter()
        _local_step(lm, x, y, eps, norm, correct, pred, r_cert, cmeth, csound, cert_at, plan, state, prog, notes,
                    n_local, K)
        finish_step("local", ts)
        checkpoint()

    # ---- 5. lower bounds ---------------------------------------------------------------------------
    if "lower" in run:
        ts = time.perf_counter()
        with torch.no_grad():
            logits = lm(x.to(lm.device)).double().cpu()
        second = logits.clone()
        if n:
            second[torch.arange(n), logits.argmax(1)] = -math.inf
        pair_counts = Counter(zip(logits.argmax(1).tolist(), second.argmax(1).tolist()))
        pairs = [p for p, _ in pair_counts.most_common(3)]
        seeds = x[:plan.lower_seeds].to(lm.device)
        with prog.stage("lower bounds", len(pairs) + (1 if norm == "2" else 0), step="lower") as adv:
            lsteps = lower_steps if lower_steps is not None else plan.lower_steps
            lbs = margin_lipschitz_lower_bound(lm.module, seeds, pairs, norm=norm, steps=lsteps, restarts=2,
                                               generator=g, clip=None) if pairs and n else []
            adv(len(pairs))
            rows = []
            for p, lb in zip(pairs, lbs):
                up = float(K[p[0], p[1]])
                rows.append(PairTightness(tuple(p), up, lb.value, up / lb.value if lb.value > 0 else math.inf,
                                          lb.method))
            state["pairs"] = rows
            if norm == "2" and n:
                jl = jacobian_spectral_lower_bound(lm.module, x[:plan.jac_seeds].to(lm.device), generator=g,
                                                   steps=plan.jac_steps)
                state["jac"] = (jl.value, jl.method)
                adv(1)
        finish_step("lower", ts)
        checkpoint()

    # ---- 6. LipSDP and the compositional bounds ---------------------------------------------------
    if "lipsdp" in run and norm == "2":
        ts = time.perf_counter()
        with prog.stage("LipSDP", 1, step="lipsdp") as adv:
            _lipsdp_step(lm, state, notes)
            adv(1)
        finish_step("lipsdp", ts)
    elif "lipsdp" in run:
        notes.append("LipSDP and the compositional bounds are l2 bounds: skipped for l_inf")

    return build(partial=False)


def _lipsdp_step(lm, state, notes):
    jac_lower = state["jac"][0]
    try:
        from lipverify.bounds.lipsdp import lipsdp
        from lipverify.bounds.lipsdp_graph import extract_weights

        weights, lo, hi = extract_weights(lm.graph)
        hidden = sum(w.shape[0] for w in weights[:-1])
        if lo >= 0:
            from lipverify.bounds.eclipse import eclipse, eclipse_fast

            info = {}
            for name, fn in (("eclipse-fast", eclipse_fast), ("eclipse", eclipse)):
                r = fn(weights, alpha=lo, beta=hi)
                info[name] = {"value": r.value, "sound": r.sound, "method": r.method, "time_s": r.time_s,
                              "ratio_to_lower": r.value / jac_lower if jac_lower else None}
            state["eclipse"] = info
        if hidden <= 300:
            res = lipsdp(weights, alpha=lo, beta=hi)
            state["lipsdp"] = {"value": res.value, "sound": res.sound, "method": res.method, "time_s": res.solve_time,
                               "ratio_to_lower": res.value / jac_lower if jac_lower else None}
        else:
            notes.append(f"LipSDP skipped: {hidden} hidden neurons")
    except Exception as exc:  # not applicable to this architecture
        notes.append(f"LipSDP not applicable: {str(exc).splitlines()[0]}")


#: ``audit`` adds CROWN to its local certificates (``method="best"``) when at most this many units need
#: intermediate bounds by backward walks (:func:`lipverify.bounds.crown.refined_units`)
CROWN_AUDIT_UNITS = AFFORDABLE_UNITS


def local_method(lm, notes: list, budgeted: bool = False, global_share: float = 0.0) -> str:
    """``"best"`` (local constants and CROWN, the larger sound radius) where CROWN applies and is
    affordable, else ``"local"``, with a note saying why.  Within a time budget ``"crown"`` instead of
    ``"best"``: CROWN alone certifies about twice the inputs in the same time, and its radii were at
    least the local constants' on every public model (benchmarks/bench_crown.py); but where the global
    certificates already hold on at least half of the correct inputs at the smallest eps (a network
    trained for certification), the cheaper local constants are kept."""
    from lipverify.bounds.crown import check_supported, refined_units
    from lipverify.errors import UnsupportedOpError

    try:
        check_supported(lm.graph)
    except UnsupportedOpError as exc:
        notes.append(f"CROWN certificates not tried: {exc}")
        return "local"
    units = refined_units(lm.graph)
    if units > CROWN_AUDIT_UNITS:
        notes.append(f"CROWN certificates not tried: {units} units would need intermediate bounds (more than "
                     f"{CROWN_AUDIT_UNITS}); 'lipverify certify --method crown' runs them")
        return "local"
    if budgeted and global_share >= 0.5:
        notes.append(f"local certificates by the local constants (the global ones already certify "
                     f"{global_share:.0%} of the correct inputs at the smallest eps; certify --method crown "
                     "tries linear bound propagation)")
        return "local"
    if budgeted:
        notes.append("local certificates by CROWN (linear bound propagation; within the time budget it certifies "
                     "more inputs than the local constants; --time-budget none compares both per input)")
        return "crown"
    notes.append("local certificates: the larger sound radius of the local constants and CROWN (method best)")
    return "best"


def _local_step(lm, x, y, eps, norm, correct, pred, r_cert, cmeth, csound, cert_at, plan, state, prog, notes,
                n_local, K):
    """Local certificates (input by input within the budget) and the local/global constant ratio."""
    n = len(x)
    top = max(eps) if eps else None
    todo = [i for i in range(n) if correct[i] and not (top is not None and cert_at[top][i])]
    budget = plan.local_budget_s
    n_ok = int(correct.sum())
    share = float((correct & cert_at[min(eps)]).sum()) / n_ok if eps and n_ok else 0.0
    cert_method = local_method(lm, notes, budgeted=budget is not None, global_share=share)
    t_start = time.perf_counter()
    examined, gained = 0, 0
    per_input = None
    with prog.stage("local certificates", max(len(todo), 1), step="local", limit_s=budget) as adv:
        k = 0
        while k < len(todo):
            if budget is not None and per_input is not None:
                left = budget - (time.perf_counter() - t_start)
                size = int(left / per_input)
                if size < 1:
                    break
                size = min(size, 16)
            else:
                size = 1 if budget is not None else 64
            idx = todo[k:k + size]
            t1 = time.perf_counter()
            sub = lm.certify(x[idx], y[idx], eps=eps, norm=norm, method=cert_method)
            dt = time.perf_counter() - t1
            per_input = dt / len(idx) if per_input is None else 0.5 * per_input + 0.5 * dt / len(idx)
            for j, c in zip(idx, sub.inputs):
                before = [bool(cert_at[e][j]) for e in eps]
                r_new = c.radius if c.sound else 0.0
                if r_new > r_cert[j]:
                    r_cert[j] = r_new
                    cmeth[j] = c.method
                    csound[j] = bool(c.sound)
                for e in eps:
                    if c.sound and c.certified_at.get(e, False):
                        cert_at[e][j] = True
                if any(bool(cert_at[e][j]) and not b for e, b in zip(eps, before)):
                    gained += 1
            examined += len(idx)
            k += len(idx)
            adv(len(idx))
    if examined < len(todo):
        notes.append(f"time budget: local certificates tried on {examined} of the {len(todo)} inputs that "
                     "needed them (the others keep their global certificates; --time-budget none tries all)")
    state["local_cert"] = {"examined": examined, "gained": gained, "candidates": len(todo)}

    # local / global margin constants at the largest eps on the first inputs (the bound's tightness)
    if not (n_local and top):
        return
    m = min(n_local, n)
    if budget is not None and per_input is not None:
        left = budget - (time.perf_counter() - t_start)
        # one local-constant computation costs about one bisection step of a local certificate
        calls = len(eps) + 1 + 8
        m = min(m, int(left / max(per_input / calls, 1e-9)))
    if m < 1:
        notes.append("time budget: the local/global constant comparison was left out")
        return
    try:
        from lipverify.bounds.local import local_margin_constants

        with prog.stage("local constants", 1, step="local") as adv:
            xs = x[:m].to(lm.device, torch.float64)
            p_loc = torch.tensor(pred[:m])
            with torch.no_grad():
                logits = lm(x[:m].to(lm.device)).double().cpu()
            second = logits.clone()
            second[torch.arange(m), logits.argmax(1)] = -math.inf
            loc = local_margin_constants(lm.graph, xs, top, norm, domain=lm.effective_domain(), rows=p_loc)
            second_idx = second.argmax(1)
            k_loc = loc.K.cpu()[torch.arange(m), p_loc, second_idx]
            k_glob = K.cpu()[p_loc, second_idx]
            ratio = (k_loc / k_glob).numpy()
            adv(1)
        state["local"] = {"eps": top, "n": int(m), "median_local_over_global": float(np.median(ratio)),
                          "min_local_over_global": float(np.min(ratio)),
                          "sound_fraction": float(loc.sound.double().mean())}
    except Exception as exc:
        notes.append(f"local bounds not computed: {str(exc).splitlines()[0]}")
