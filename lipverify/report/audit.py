"""The two-sided audit: how robust a model provably is, how robust it empirically is, and how much of
the difference is the bound's fault.

* upper side: sound global bound, LipSDP where it applies, local (IBP-masked) bounds, certified radii;
* lower side: optimised Lipschitz lower bounds (witness pairs) and adversarial radii from attacks that
  use only the forward pass;
* the soundness invariant ``r_cert(x) <= r_adv(x)`` is checked on every input; a violation is a bug in
  lipverify and is reported first (exit code 3 in the CLI).
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
    inputs: list  # dicts: index, label, pred, r_cert, r_adv, cert_method, sound
    curves: dict  # eps grid -> clean / certified / empirical
    accuracy_at_eps: dict
    violations: list
    verdict: list
    time_s: float
    notes: list = field(default_factory=list)
    compositional: dict | None = None  # eclipse-fast / eclipse bounds of dense chains

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pairs"] = [asdict(p) if not isinstance(p, dict) else p for p in self.pairs]
        return _jsonable(d)


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


def run_audit(lm, x: torch.Tensor, y: torch.Tensor, eps: list[float], norm: str = "2", clip=None,
              lower_steps: int = 150, n_local: int = 16, strength: str = "standard", seed: int = 0,
              progress=None, method: str = "local") -> AuditResult:
    t0 = time.perf_counter()
    notes: list[str] = []
    g = torch.Generator().manual_seed(seed)

    def step(msg):
        if progress:
            progress(msg)

    step("bounds")
    rep = lm.bounds(norm)
    K = lm.margin_constants(norm).K
    glob = rep.global_bound.value

    step("certify")
    cert = lm.certify(x, y, eps=eps, norm=norm, method=method)
    r_cert = np.array([c.radius if c.sound else 0.0 for c in cert.inputs])
    pred = np.array([c.pred for c in cert.inputs])
    labels = y.numpy().astype(int)

    step("attack")
    fwd = lm.module
    adv = lm.attack(x, y, eps=eps, norm=norm, clip=clip, strength=strength, seed=seed)
    r_adv = adv.radius.cpu().double().numpy()
    notes.append(f"attacks ({strength}): {'; '.join(adv.tried)}; every adversarial point checked in "
                 f"{adv.precision}")
    # The invariant compares two distances to a change of the prediction.  On a misclassified input
    # r_adv is 0 (the label is already wrong) while r_cert is the radius in which the (wrong)
    # prediction cannot change: no contradiction, so only correctly classified inputs are checked.
    violations = []
    for i in range(len(x)):
        if pred[i] == labels[i] and r_cert[i] > r_adv[i] * (1 + 1e-9) + 1e-12:
            violations.append({"index": i, "r_cert": float(r_cert[i]), "r_adv": float(r_adv[i])})

    # lower bounds on the margin constants for the pairs that matter (prediction vs nearest class)
    step("lower bounds")
    with torch.no_grad():
        logits = lm(x.to(lm.device)).double().cpu()
    second = logits.clone()
    second[torch.arange(len(x)), logits.argmax(1)] = -math.inf
    pair_counts = Counter(zip(logits.argmax(1).tolist(), second.argmax(1).tolist()))
    pairs = [p for p, _ in pair_counts.most_common(3)]
    lbs = margin_lipschitz_lower_bound(fwd, x[:32].to(lm.device), pairs, norm=norm, steps=lower_steps,
                                       restarts=2, generator=g, clip=None)
    pair_rows = []
    for p, lb in zip(pairs, lbs):
        up = float(K[p[0], p[1]])
        pair_rows.append(PairTightness(tuple(p), up, lb.value, up / lb.value if lb.value > 0 else math.inf,
                                       lb.method))
    jac_lower, jac_method = None, ""
    if norm == "2":
        jl = jacobian_spectral_lower_bound(fwd, x[:16].to(lm.device), generator=g)
        jac_lower, jac_method = jl.value, jl.method

    # LipSDP and the compositional bounds where they apply
    lipsdp_info = None
    eclipse_info = None
    if norm == "2":
        step("LipSDP")
        try:
            from lipverify.bounds.lipsdp import lipsdp
            from lipverify.bounds.lipsdp_graph import extract_weights

            weights, lo, hi = extract_weights(lm.graph)
            hidden = sum(w.shape[0] for w in weights[:-1])
            if lo >= 0:
                from lipverify.bounds.eclipse import eclipse, eclipse_fast

                eclipse_info = {}
                for name, fn in (("eclipse-fast", eclipse_fast), ("eclipse", eclipse)):
                    r = fn(weights, alpha=lo, beta=hi)
                    eclipse_info[name] = {"value": r.value, "sound": r.sound, "method": r.method, "time_s": r.time_s,
                                          "ratio_to_lower": r.value / jac_lower if jac_lower else None}
            if hidden <= 300:
                res = lipsdp(weights, alpha=lo, beta=hi)
                lipsdp_info = {"value": res.value, "sound": res.sound, "method": res.method,
                               "time_s": res.solve_time,
                               "ratio_to_lower": res.value / jac_lower if jac_lower else None}
            else:
                notes.append(f"LipSDP skipped: {hidden} hidden neurons")
        except Exception as exc:  # not applicable to this architecture
            notes.append(f"LipSDP not applicable: {str(exc).splitlines()[0]}")

    # local bounds on the first inputs (tightness of the local upper bound)
    local_info = None
    e_loc = max(eps) if eps else None
    if n_local and e_loc:
        step("local bounds")
        try:
            from lipverify.bounds.local import local_margin_constants

            xs = x[:n_local].to(lm.device, torch.float64)
            p_loc = torch.tensor(pred[:n_local])
            loc = local_margin_constants(lm.graph, xs, e_loc, norm, domain=lm.effective_domain(), rows=p_loc)
            second_idx = second[:n_local].argmax(1)
            k_loc = loc.K.cpu()[torch.arange(len(xs)), p_loc, second_idx]
            k_glob = K.cpu()[p_loc, second_idx]
            ratio = (k_loc / k_glob).numpy()
            local_info = {"eps": e_loc, "n": int(len(xs)), "median_local_over_global": float(np.median(ratio)),
                          "min_local_over_global": float(np.min(ratio)),
                          "sound_fraction": float(loc.sound.double().mean())}
        except Exception as exc:
            notes.append(f"local bounds not computed: {str(exc).splitlines()[0]}")

    # curves
    correct = pred == labels
    top = max([float(np.max(np.where(np.isfinite(r_adv), r_adv, 0))) if len(r_adv) else 0.0]
              + list(eps) + [1e-6])
    grid = np.linspace(0, top * 1.05, 60)
    curves = {"eps": grid.tolist(),
              "clean": [float(correct.mean())] * len(grid),
              "certified": [float((correct & (r_cert > e)).mean()) for e in grid],
              "empirical": [float((correct & (r_adv > e)).mean()) for e in grid]}
    acc_eps = {f"{e:.6g}": {"certified": float((correct & (r_cert > e)).mean()),
                            "empirical": float((correct & (r_adv > e)).mean())} for e in eps}

    inputs = [{"index": i, "label": int(labels[i]), "pred": int(pred[i]), "r_cert": float(r_cert[i]),
               "r_adv": float(r_adv[i]), "r_adv_found_by": adv.found_by[i], "cert_method": cert.inputs[i].method,
               "sound": cert.inputs[i].sound}
              for i in range(len(x))]
    verdict = _verdict(glob, jac_lower, pair_rows, r_cert, r_adv, correct, eps, norm, violations, lipsdp_info,
                       local_info, eclipse_info)
    return AuditResult(lm.name, norm, len(x), list(eps), clip, rep.to_dict(), glob, jac_lower, jac_method,
                       lipsdp_info, local_info, pair_rows, inputs, curves, acc_eps, violations, verdict,
                       time.perf_counter() - t0, notes + list(lm.notes), eclipse_info)


def _verdict(glob, lower, pairs, r_cert, r_adv, correct, eps, norm, violations, lipsdp_info, local_info,
             eclipse_info=None):
    lines = []
    if violations:
        lines.append(f"SOUNDNESS VIOLATION: {len(violations)} input(s) certified beyond an adversarial example "
                     "— this is a bug in lipverify; do not trust these certificates.")
    if lower:
        lines.append(f"The global bound {glob:.4g} is {glob / lower:.1f}x the best lower bound found ({lower:.4g}).")
    if pairs:
        worst = max(p.ratio for p in pairs)
        best = min(p.ratio for p in pairs)
        lines.append(f"The margin bound is {best:.1f}x to {worst:.1f}x looser than the best lower bound found "
                     f"for the class pairs that decide predictions.")
    ok = correct & np.isfinite(r_adv)
    if ok.any():
        ratio = np.median(r_cert[ok] / np.maximum(r_adv[ok], 1e-300))
        lines.append(f"Median certified radius is {100 * ratio:.1f}% of the adversarial radius found by attacks "
                     f"(l{norm}).")
    cert_frac = [(e, float((correct & (r_cert > e)).mean())) for e in eps]
    vacuous = [e for e, f in cert_frac if f == 0.0]
    if vacuous:
        lines.append(f"Certificates are vacuous (no input certified) at eps >= {min(vacuous):.4g}.")
    for e, f in cert_frac:
        emp = float((correct & (r_adv > e)).mean())
        lines.append(f"At eps={e:.4g}: {100 * f:.1f}% certified, {100 * emp:.1f}% empirically robust "
                     f"(gap {100 * (emp - f):.1f} points).")
    if lipsdp_info and lipsdp_info.get("sound"):
        lines.append(f"LipSDP tightens the global bound to {lipsdp_info['value']:.4g} "
                     f"(product of layer norms: {glob:.4g}).")
    if eclipse_info and "eclipse" in eclipse_info:
        e = eclipse_info["eclipse"]
        lines.append(f"The compositional bound (eclipse, {e['time_s']:.1f} s) is {e['value']:.4g}"
                     + (f", {e['value'] / lower:.1f}x the lower bound." if lower else "."))
    if local_info:
        lines.append(f"Local bounds at eps={local_info['eps']:.4g} are {100 * local_info['median_local_over_global']:.2g}% "
                     "of the global margin constant (median): "
                     + ("little gain post hoc, as expected for a network not trained for it."
                        if local_info["median_local_over_global"] > 0.8 else "a substantial gain."))
    if not violations:
        lines.append("Soundness invariant r_cert <= r_adv held on every input.")
    return lines
