"""The audit's words: a one-line answer and the verdict, generated from the numbers only.

Every sentence is chosen by a rule on the numbers it states, so the words cannot contradict them:

* the headline names the largest requested eps at which any input is certified, with the certified
  and empirically robust fractions and the points in between; when nothing is certified at any eps it
  says so and names the smallest eps and the two median radii, which show how far the bound is from it;
* a tightness judgement ("tight", "loose", "vacuous") follows the upper/lower ratio;
* the fractions per eps are in the table beside the verdict, not repeated in it;
* the local-bound line says whether the smaller local constants certified any more inputs, measured
  by the local certificates themselves, not by the ratio alone.

Warnings
--------
The thresholds are conventions, stated where they are used: a ratio of at most 2 is called tight, at
most 100 loose, above that vacuous for certification.
"""

from __future__ import annotations

import numpy as np

from lipverify.report.numbers import eps as fmt_eps
from lipverify.report.numbers import num, pct, ratio

#: upper/lower ratios at most this are "tight"
TIGHT = 2.0
#: ... at most this "loose"; above, "far too loose to certify"
LOOSE = 100.0


def norm_name(norm: str) -> str:
    return "l_inf" if str(norm) == "inf" else f"l{norm}"


def certified_fractions(correct, cert_at: dict, eps: list) -> dict:
    return {e: float((correct & np.asarray(cert_at[e], dtype=bool)).mean()) if len(correct) else 0.0 for e in eps}


def empirical_fractions(correct, r_adv, eps: list) -> dict | None:
    if r_adv is None:
        return None
    return {e: float((correct & (r_adv > e)).mean()) if len(correct) else 0.0 for e in eps}


def headline(norm, eps, cert: dict, emp: dict | None, r_cert, r_adv, correct, clean: float, n: int,
             n_classes: int | None = None) -> str:
    """One line: what is proven, what is observed, the gap."""
    nn = norm_name(norm)
    if n == 0:
        return "No inputs were audited."
    if n_classes and clean <= 1.0 / n_classes:
        return (f"Clean accuracy {pct(clean)} is at or below chance (1/{n_classes}): the data do not match "
                "the model, so no robustness number here means anything.")
    if not eps:
        med = float(np.median(r_cert[correct])) if correct.any() else 0.0
        return f"Median certified radius ({nn}) {num(med)} on correctly classified inputs ({pct(clean)} of {n})."
    hit = [e for e in eps if cert[e] > 0]
    if hit:
        e = max(hit)
        line = f"Certified at {nn} eps = {fmt_eps(e)} on {pct(cert[e])} of {n} inputs"
        if emp is not None:
            gap = emp[e] - cert[e]
            line += f"; empirically robust on {pct(emp[e])}; {pct(max(gap, 0.0))} unproven"
        else:
            line += "; no attack was run, so the empirical side is unknown"
        return line + "."
    e = min(eps)
    ok = correct
    med_c = float(np.median(r_cert[ok])) if ok.any() else 0.0
    line = f"Nothing is certified at any requested eps (smallest {nn} eps = {fmt_eps(e)})"
    if emp is not None:
        med_a = float(np.median(r_adv[ok])) if ok.any() else 0.0
        line += (f"; empirically robust on {pct(emp[e])} at eps = {fmt_eps(e)}; median certified radius "
                 f"{num(med_c)} vs median adversarial radius {num(med_a)}")
    else:
        line += f"; median certified radius {num(med_c)}"
    return line + "."


def tightness_word(r: float) -> str:
    if not np.isfinite(r):
        return "no lower bound to compare"
    if r <= TIGHT:
        return "tight"
    if r <= LOOSE:
        return "loose"
    return "far too loose to certify"


def verdict(*, norm, glob, lower, pairs, r_cert, r_adv, correct, eps, cert, emp, violations, lipsdp_info,
            local_info, eclipse_info=None, local_cert=None) -> list[str]:
    """The verdict lines (see the module docstring).

    ``local_cert``: ``{"examined": k, "gained": g, "eps": e}``, the inputs the local certificates were
    tried on and how many of them they certified at some requested eps beyond the global ones."""
    lines = []
    if violations:
        lines.append(f"SOUNDNESS VIOLATION: {len(violations)} input(s) certified beyond an adversarial example "
                     "- this is a bug in lipverify; do not trust these certificates.")
    if lower:
        r = glob / lower
        lines.append(f"The global bound {num(glob)} is {ratio(r)} the best lower bound found ({num(lower)}): "
                     f"{tightness_word(r)}.")
    if pairs:
        rs = [p.ratio for p in pairs]
        lo, hi = min(rs), max(rs)
        span = ratio(lo) if ratio(lo) == ratio(hi) else f"{ratio(lo)} to {ratio(hi)}"
        lines.append(f"The margin bounds of the class pairs that decide predictions are {span} the best lower "
                     f"bounds found: {tightness_word(hi)}.")
    if r_adv is not None:
        ok = correct & np.isfinite(r_adv) & (r_adv > 0)
        if ok.any():
            med = float(np.median(r_cert[ok] / r_adv[ok]))
            lines.append(f"The median certified radius is {pct(med)} of the adversarial radius the attacks found "
                         f"({norm_name(norm)}).")
    vac = [e for e in eps if cert[e] == 0.0]
    if vac:
        lines.append(f"Certificates are vacuous (no input certified) at eps >= {fmt_eps(min(vac))}.")
    if lipsdp_info and lipsdp_info.get("sound"):
        lines.append(f"LipSDP tightens the global bound to {num(lipsdp_info['value'])} "
                     f"(product of layer norms: {num(glob)}).")
    if eclipse_info and "eclipse" in eclipse_info:
        e = eclipse_info["eclipse"]
        lines.append(f"The compositional bound (eclipse, {e['time_s']:.1f} s) is {num(e['value'])}"
                     + (f", {ratio(e['value'] / lower)} the lower bound." if lower else "."))
    if local_cert is not None and local_cert.get("examined"):
        k, g = local_cert["examined"], local_cert["gained"]
        lines.append(f"Local certificates were tried on {k} input(s) the global bound left uncertified: "
                     + (f"they certified {g} more at some requested eps." if g else
                        "they certified none of them at any requested eps."))
    if local_info:
        m = local_info["median_local_over_global"]
        lines.append(f"Local margin constants at eps = {fmt_eps(local_info['eps'])} are {pct(m)} of the global "
                     f"ones (median over {local_info['n']} inputs)"
                     + (": little room for local certificates." if m > 0.8 else "."))
    if not violations and r_adv is not None:
        lines.append("Soundness invariant r_cert <= r_adv held on every correctly classified input.")
    return lines
