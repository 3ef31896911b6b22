"""Certified radii per input: global (GloRo) and IBP-masked local certification.

Global rule (Leino et al. 2021, SPEC section 3).  With prediction ``j = argmax f(x)`` and margin
constants ``K``, ``x`` is certified at radius ``eps`` iff for every ``i != j``::

    f_j(x) - f_i(x) > eps * K_ji          (strict)

and the certified radius is ``r(x) = min_{i != j} (f_j(x) - f_i(x)) / K_ji`` (0 when the margin is
<= 0).  A tie for the top logit is never certified: the check excludes only the argmax *index*, so a
second class with the same logit has margin 0 and fails the strict inequality.  Logits are computed in
float64 and ``K`` once per model, so certification costs about one forward pass.

Local rule (Huang et al. 2021, SPEC section 4).  Local margin constants ``K(x, eps)`` are valid only
inside ``B(x, eps)``: ``x`` is certified at ``eps`` iff ``margin_i > eps * K_ji(x, eps)``; the largest
certified radius is found by bisection over ``eps`` (``K(x, eps)`` is non-decreasing in ``eps``).  Only
points the global bound did not certify go through it.  The local constants are proven bounds on every
architecture (:mod:`lipverify.certify.local`); a record whose constants were not (``sound`` false,
method ``local (estimate)``) would never be counted in the VRA.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lipverify.arguments import default_box, eps_key, parse_eps, parse_norm
from lipverify.bounds.domain import DomainForward
from lipverify.bounds.global_bound import describe_domain
from lipverify.errors import UserInputError


@dataclass
class InputCertificate:
    index: int
    label: int
    pred: int
    margin: float
    radius: float
    certified: bool
    method: str
    sound: bool
    certified_at: dict = field(default_factory=dict)  # eps -> bool (sound certificates)
    name: str = ""

    def to_dict(self) -> dict:
        return {"index": self.index, "label": self.label, "pred": self.pred, "margin": self.margin,
                "radius": self.radius, "certified": self.certified, "method": self.method,
                "sound": self.sound, "certified_at": {repr_eps(k): v for k, v in self.certified_at.items()},
                "name": self.name}


def repr_eps(e) -> str:
    """The JSON key of a radius (:func:`lipverify.arguments.eps_key`: shortest round-trip decimal)."""
    return eps_key(e)


#: certificate methods by code in :attr:`CertifyResult.method_code`
METHODS = ("global", "local", "local (estimate)", "global (float32, rounding error bounded)", "crown")
#: the ``method`` argument of :func:`certify`
CERTIFY_METHODS = ("global", "local", "crown", "crown-ibp", "alpha-crown", "best")
#: Adam steps of ``alpha-crown`` per bound
ALPHA_STEPS = 20
#: relative inflation of ``K`` in the rule: the rule's own float64 products and quotients round by at
#: most ``2^-53`` each, so ``d > fl(eps * K (1 + 2^-51))`` proves ``d > eps K`` and ``fl(d / (K (1 +
#: 2^-51)))`` is at most ``d / K``
RULE_FACTOR = 1.0 + 2.0 ** -51
#: inputs in the first float32 batch (at most; ``n / 16`` on small runs, at least 8), the probe that
#: chooses the rounding bound, or float64 directly (:func:`certify`)
PROBE = 32
#: cost of certifying an input with the entry-wise running error bound, and in float64, relative to the
#: float32 pass with the sensitivity bound (``other``: accelerators, where float64 is far slower)
RUNNING_COST = 2.0
FLOAT64_COST = {"cpu": 4.0, "other": 32.0}
#: the running bound is tried only when the sensitivity bound's median is below this many top margins
RUNNING_REACH = 30.0
#: the bound proven once over the range of the inputs (:class:`~lipverify.bounds.domain.DomainForward`)
#: is tried when the per-example bound's median is below this fraction of the median top margin, and
#: used only when its own is too (it lowers the proven radii by about that fraction); its pass costs
#: about this much of the pass with the per-example bound
DOMAIN_REACH = 0.02
DOMAIN_COST = 0.8
#: logits (rows times classes) the rule decides at once: many batches' worth of tensor work per call,
#: with memory bounded
RULE_BLOCK_ENTRIES = 1 << 22


@dataclass
class CertifyResult:
    """Per-input radii plus the summary the CLI prints (VRA counts sound certificates only).

    Radii are float keys: ``vra[0.5]``, ``vra_with_estimates[0.5]``, ``certified_at[0.5]`` (JSON:
    :func:`lipverify.arguments.eps_key` strings).  ``vra[e]`` is the fraction of inputs that are
    correctly classified *and* soundly certified at ``e``.  ``counts`` (JSON ``certified_by``) counts,
    per certificate method, the correctly classified inputs certified at the largest eps (or at each
    one's own eps; with no eps: radius > 0), so ``sum(counts.values()) == vra[max(eps)] * n``;
    ``stable_misclassified`` counts the inputs whose (wrong) prediction is certified there: stable, but
    not robust, and in no VRA.  ``certified`` (per input) says whether the prediction is certified,
    correct or not.

    The per-input results are tensors (``pred``, ``label``, ``margin``, ``radius``, ``sound``,
    ``method_code`` into :data:`METHODS`, ``certified_at``: eps -> bool tensor, ``certified``: at the
    largest eps or each example's own eps); :attr:`inputs` builds the per-input records from them on
    first use (JSON / CSV output, reports), so certifying itself stays tensor work.  Results built from
    records (``records``) keep them as given.
    """

    n: int
    norm: str
    method: str
    eps: list[float]
    clean_accuracy: float
    vra: dict  # eps -> fraction correct and soundly certified
    records: list | None  # per-input InputCertificate objects, or None: built lazily from the tensors
    counts: dict  # certificate method -> number of inputs certified at the largest eps by it
    median_radius: float
    time_s: float
    per_example_eps: bool = False
    notes: list[str] = field(default_factory=list)
    vra_with_estimates: dict = field(default_factory=dict)
    pred: torch.Tensor | None = None
    label: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    radius: torch.Tensor | None = None
    sound: torch.Tensor | None = None
    method_code: torch.Tensor | None = None
    certified: torch.Tensor | None = None
    all_certified_at: dict = field(default_factory=dict, repr=False)  # eps -> bool; -1.0: per-example eps
    names: list | None = None
    #: inputs whose wrong prediction is certified at the largest eps (not counted in ``counts``)
    stable_misclassified: int = 0
    #: seconds including loading the model and data (set by the command line; None from the API)
    total_time_s: float | None = None
    #: the labelled time line of the command (``time 19.9 s (load 15.2 s, certify 4.7 s)``)
    time_label: str | None = None

    def __repr__(self) -> str:
        vra = ", ".join(f"{_eps_short(k)}: {v:.4g}" for k, v in list(self.vra.items())[:4])
        more = ", ..." if len(self.vra) > 4 else ""
        return (f"CertifyResult(n={self.n}, norm={self.norm!r}, method={self.method!r}, "
                f"clean_accuracy={self.clean_accuracy:.4g}, vra={{{vra}{more}}}, "
                f"median_radius={self.median_radius:.6g}, certified_by={self.counts}, time_s={self.time_s:.3g})")

    @property
    def certified_at(self) -> dict:
        """eps -> bool tensor over the inputs (the requested radii)."""
        return {k: v for k, v in self.all_certified_at.items() if k >= 0}

    @property
    def inputs(self) -> list[InputCertificate]:
        """Per-input records (built once from the tensors)."""
        if self.records is None:
            y_l, p_l, m_l, r_l = self.label.tolist(), self.pred.tolist(), self.margin.tolist(), self.radius.tolist()
            c_l, s_l, k_l = self.certified.tolist(), self.sound.tolist(), self.method_code.tolist()
            at = {k: v.tolist() for k, v in self.certified_at.items()}
            names = self.names
            self.records = [InputCertificate(i, y_l[i], p_l[i], m_l[i], r_l[i], bool(c_l[i]), METHODS[k_l[i]],
                                             bool(s_l[i]), {k: v[i] for k, v in at.items()},
                                             names[i] if names is not None else str(i))
                            for i in range(self.n)]
        return self.records

    def to_dict(self) -> dict:
        return {"n": self.n, "norm": self.norm, "method": self.method, "eps": self.eps,
                "clean_accuracy": self.clean_accuracy, "vra": {repr_eps(k): v for k, v in self.vra.items()},
                "vra_with_estimates": {repr_eps(k): v for k, v in self.vra_with_estimates.items()},
                "median_radius": self.median_radius, "certified_by": self.counts,
                "stable_misclassified": self.stable_misclassified,
                "per_example_eps": self.per_example_eps, "time_s": self.time_s,
                **({} if self.total_time_s is None else {"total_time_s": self.total_time_s}),
                **({} if self.time_label is None else {"time_label": self.time_label}),
                "notes": self.notes, "inputs": [c.to_dict() for c in self.inputs]}


def global_radii(logits: torch.Tensor, K: torch.Tensor, delta: torch.Tensor | None = None):
    """Prediction, top margin and certified radius for a batch of logits.

    Returns ``pred``, ``margin`` (``f_j - max_{i != j} f_i`` as computed), ``radius``, the per-class
    margins and the mask of ``i != j``.  ``delta`` (``(B,)`` or ``(B, m)``, per example or per class):
    a proven bound on the error of each computed difference ``f_j - f_i`` with ``j`` the computed
    argmax (:class:`lipverify.bounds.rounding.RoundedForward`); the per-class margins returned are then
    the lower bounds ``f_j - f_i - delta`` and the radius holds for the exact network.  A lower bound
    ``<= 0`` leaves even the prediction open: radius 0.
    """
    out = radii_with_delta(logits, K, delta)
    return out[:5]


def radii_with_delta(logits: torch.Tensor, K: torch.Tensor, delta: torch.Tensor | None = None):
    """:func:`global_radii` plus the ``(B, m)`` bound on the error of each difference
    (:func:`rule_delta`; None without ``delta``), in as few tensor passes as the rule allows."""
    logits = logits.double()
    K = K.to(logits.device, torch.float64)
    pred = logits.argmax(1)
    diffs = logits.gather(1, pred[:, None]) - logits  # f_j - f_i, 0 at i = j
    mask = torch.arange(logits.shape[1], device=logits.device)[None, :] != pred[:, None]
    off = ~mask
    margin = diffs.masked_fill(off, math.inf).amin(1)
    dl = None
    if delta is not None:
        dl = rule_delta(logits, delta)
        diffs = diffs - dl
    lower = diffs.masked_fill(off, math.inf).amin(1)
    # d / K_ji: +inf for K = 0 < d; where some d <= 0 (0 / 0 included) the radius is 0 by ``lower``
    ratio = (diffs / K[pred]).masked_fill(off, math.inf)
    radius = torch.where(lower > 0, ratio.amin(1), torch.zeros_like(lower))
    return pred, margin, radius, diffs, mask, dl


def rule_delta(logits: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``(B, m)`` bound on the error of the float64 differences ``f_j - f_i`` of computed logits: the
    rounding bound ``delta`` (``(B,)`` or ``(B, m)``) plus the subtraction's own rounding (at most
    ``2^-52 max |f|``)."""
    logits = logits.double()
    delta = delta.to(logits)
    if delta.dim() == 1:
        delta = delta[:, None]
    return delta + 2.0 ** -51 * logits.abs().amax(1, keepdim=True)


def certified_at(diffs: torch.Tensor, mask: torch.Tensor, Kj: torch.Tensor, eps: torch.Tensor | float) -> torch.Tensor:
    """Strict GloRo rule ``f_j - f_i > eps * K_ji`` for all ``i != j`` (``eps``: per example, or one float)."""
    lim = Kj * eps[:, None] if isinstance(eps, torch.Tensor) else Kj * float(eps)
    return ((diffs > lim) | ~mask).all(1)


def check_certifiable(model, norm: str) -> None:
    """Refuse certificates the model's constants cannot give: l-inf distance nets certify in l-inf only,
    and only with ``p = inf`` in every layer (an l-p relaxation is ``d^(1/p)``-Lipschitz, not 1)."""
    layers = [n for n in model.graph.nodes if n.kind == "linf_dist"]
    if not layers:
        return
    if str(norm) != "inf":
        raise UserInputError("l-inf distance nets are certified in the l-inf norm only (margin > 2 eps): use "
                             "--norm inf")
    finite = [n for n in layers if math.isfinite(n.op.p)]
    if finite:
        raise UserInputError(f"{len(finite)} l-inf distance layer(s) use the l-p relaxation (p = {finite[0].op.p:g}); "
                             "certificates need p = inf in every layer (net.set_p(float('inf')))")


def inside_domain(t: torch.Tensor, dom, like: torch.Tensor) -> torch.Tensor:
    """Per example: every entry of ``t`` lies in the box ``dom = (lo, hi)`` (float64 comparison)."""
    lo, hi = (torch.as_tensor(v, dtype=torch.float64) for v in dom)
    t64 = t.detach().to(torch.float64).cpu()
    ok = (t64 >= lo) & (t64 <= hi)
    return ok.reshape(len(like), -1).all(1)


def progress_total(n: int, method: str = "global") -> int:
    """The total that :func:`certify` advances its ``progress`` callback by for ``n`` inputs."""
    return n if method == "global" else 2 * n


def certify(model, x: torch.Tensor, y: torch.Tensor, eps: float | Sequence[float] | torch.Tensor = (),
            norm: str = "2", method: str = "global", batch_size: int | None = None,
            progress: Callable | None = None, names: Sequence[str] | None = None, local_options: dict | None = None,
            precision: str = "auto", alpha_budget: float | None = None) -> CertifyResult:
    """Certify every input of ``(x, y)`` with ``model`` (a :class:`lipverify.model.LipModel`).

    ``eps``: a float, a list of floats (VRA per eps), or a per-example tensor (e.g. from VNN-LIB
    specifications).  ``method``: ``"global"`` or ``"local"`` (global first, local bisection for the
    points global leaves uncertified).  ``batch_size``: None picks one from the device's free memory
    (:func:`lipverify.certify.batching.auto_batch_size`); batches reach the device through
    :func:`lipverify.certify.batching.stream` (pinned memory, copied one batch ahead on CUDA).

    ``progress``: a callable ``progress(k)`` advanced by the inputs done, :func:`progress_total` in all
    (``n`` for ``"global"``: per batch of the forward pass; ``2 n`` for ``"local"``: the global pass,
    then per input of the local stage in fractions of a bisection step); it reaches its total when the
    work is done.

    ``precision``: ``"float32"`` computes the logits in float32 with a proven bound on their rounding
    error (:mod:`lipverify.bounds.rounding`): an input is decided in float32 when every decision (the
    prediction, ``radius > 0``, certified at each eps) is the same for all logits within the bound, and
    recomputed in float64 (rounding bounded the same way) otherwise.  The first :data:`PROBE` inputs
    choose the bound: the sensitivity bound of :class:`~lipverify.bounds.rounding.RoundedForward`
    (cheapest), the entry-wise running error bound of
    :class:`~lipverify.bounds.running_error.RunningError` (about twice the cost, much tighter on normally
    trained deep nets), the sensitivity bound with the running bound as a second stage on the inputs it
    leaves open, the one bound over the inputs' range ``[min x, max x]`` with the sensitivity bound as
    a second stage (:class:`~lipverify.bounds.domain.DomainForward`: the plain pass; tried only where
    the bounds are below :data:`DOMAIN_REACH` of the margins), or float64 throughout, whichever leaves
    the least expected work by the fraction of the probe's decisions each leaves open
    (:data:`RUNNING_COST`, :data:`FLOAT64_COST`, :data:`DOMAIN_COST`).
    ``"float64"``: float64 only.
    ``"auto"`` (default): float32 when the graph has a rounding model, else float64.  Decisions at the
    requested radii are the float64 ones; the radius of an input decided in float32 is the one proven
    with the float32 logits, lower than the float64 one by at most ``2 delta / K``.  Records decided in
    float32 carry the method ``global (float32, rounding error bounded)``.

    ``alpha_budget``: seconds for alpha-CROWN's slope optimisation (``method="alpha-crown"``) over the
    whole call; once spent, the remaining bounds are plain CROWN's (sound) and a note says so.  None:
    no limit.

    Warnings
    --------
    A graph without a rounding model (tanh, GELU, normalisations, ...) is certified with float64 logits
    of the model taken as exact (a note says so); ``precision="float32"`` refuses such a graph.
    """
    t0 = time.perf_counter()
    if alpha_budget is not None and not (isinstance(alpha_budget, (int, float)) and 0 <= alpha_budget < math.inf):
        raise UserInputError(f"alpha_budget must be a non-negative number of seconds, got {alpha_budget!r}")
    norm = parse_norm(norm)
    if method not in CERTIFY_METHODS:
        raise UserInputError(f"method must be one of {', '.join(CERTIFY_METHODS)}, got {method!r}")
    if method in ("crown", "crown-ibp", "alpha-crown", "best"):
        from lipverify.bounds.crown import check_supported

        check_supported(model.graph)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        from lipverify.arguments import as_inputs

        x, y = as_inputs(x, y, model.input_shape, model.n_classes)
    if precision not in ("auto", "float32", "float64"):
        raise UserInputError(f"precision must be auto, float32 or float64, got {precision!r}")
    check_certifiable(model, norm)
    n = len(x)
    per_example = isinstance(eps, torch.Tensor) and eps.dim() == 1 and len(eps) == n
    eps_list = [] if per_example else sorted(set(parse_eps(eps if not isinstance(eps, torch.Tensor) else eps.tolist())))
    mc = model.margin_constants(norm)
    sound_K = mc.sound
    device = model.device
    notes = []
    fast = model.rounded_forward(norm, torch.float32) if precision != "float64" else None
    if fast is not None and not fast.supported:
        if precision == "float32":
            raise UserInputError(f"--precision float32: {fast.reason}; use --precision float64")
        fast = None
    exact = model.rounded_forward(norm, torch.float64)
    if exact.supported:
        forward64 = exact
    else:
        module64 = model.module_double()

        def forward64(xb):
            return module64(xb.to(device, torch.float64)).reshape(len(xb), -1), None

        notes.append(f"logits computed in float64 and taken as exact ({exact.reason})")
    K = mc.K.to(device, torch.float64)
    # the rule's own float64 rounding is accounted for wherever the logits carry a rounding bound
    K_rule = K * RULE_FACTOR if exact.supported else K
    from lipverify.bounds.rounding import trusted_kernels
    from lipverify.certify.batching import auto_batch_size, stream

    if batch_size is None:
        batch_size = auto_batch_size(model.graph, device, n)
    eps_check = eps.double().cpu() if per_example else None
    eps_dev = eps_check.to(device) if per_example else None
    logit_parts: list[torch.Tensor] = []  # per batch not yet decided: float64 logits, their rounding bound,
    # computed in float32 or not
    delta_parts: list[torch.Tensor] = []
    fast_parts: list[torch.Tensor] = []
    use_fast = fast is not None
    fast_call = [fast]  # the float32 evaluator with its bound (the probe may switch it)
    cascade: list = [None]  # the running bound as a second stage on the open inputs (the probe's choice)
    probe_n = min(PROBE, max(8, n // 16))  # a smaller probe on small runs, where it would be most of the work
    probe_n = probe_n if n > probe_n else 0

    def decide(logits, delta, eps_rows):
        """The rule on a block of rows, and which of them a float32 bound leaves open (the prediction,
        radius > 0, certified at each eps could differ for logits within it)."""
        p, mg, r, d, mk, dl = radii_with_delta(logits, K_rule, delta)
        if delta is None:  # float64 logits taken as exact: nothing to redo
            return (p, mg, r, d, mk), torch.zeros(len(p), dtype=torch.bool, device=p.device), \
                torch.zeros(len(p), dtype=torch.float64, device=p.device)
        Kb = K_rule[p]
        # open: the lower bound of some difference is <= 0 (prediction or radius > 0 could change), a
        # bound is not finite (a sum is finite only if every term is), or a decision at some eps differs
        # between the lower and the upper ends of the differences
        redo = ~(r > 0) | ~torch.isfinite(dl.sum(1))
        hi = d + 2.0 * dl
        for e in ([eps_rows] if per_example else eps_list):
            redo |= certified_at(d, mk, Kb, e) != certified_at(hi, mk, Kb, e)
        return (p, mg, r, d, mk), redo, dl.amax(1)

    # each batch is one forward pass; the rule runs on blocks of many batches' logits at once (tensor
    # work in large pieces, memory bounded by the block), then the inputs it leaves open are recomputed
    # in float64
    m_cls = mc.K.shape[0]
    bounded = exact.supported or fast is not None  # else float64 logits taken as exact (no delta)
    block = max(batch_size, RULE_BLOCK_ENTRIES // max(m_cls, 1))
    cols: list[list[torch.Tensor]] = [[] for _ in range(5)]
    redo_parts: list[torch.Tensor] = []
    dl_parts: list[torch.Tensor] = []
    fast_all: list[torch.Tensor] = []
    pending = [0]  # rows in logit_parts

    def flush():
        if not logit_parts:
            return
        start = sum(len(c) for c in cols[0])
        lg, dt, fr = torch.cat(logit_parts), torch.cat(delta_parts), torch.cat(fast_parts)
        logit_parts.clear(), delta_parts.clear(), fast_parts.clear()
        pending[0] = 0
        out, redo, dl = decide(lg, dt if bounded else None, eps_dev[start:start + len(lg)] if per_example else None)
        for k in range(5):
            cols[k].append(out[k])
        redo_parts.append(redo & fr)
        dl_parts.append(dl[fr])
        fast_all.append(fr)

    def keep(logits, delta, is_fast):
        logit_parts.append(logits.double())
        delta_parts.append(delta.to(logits.device, torch.float64) if delta is not None else
                           torch.zeros_like(logits, dtype=torch.float64))
        fast_parts.append(torch.full((len(logits),), is_fast, dtype=torch.bool, device=logits.device))
        pending[0] += len(logits)
        if pending[0] >= block:
            flush()

    def open_rows(logits, delta):
        """The probe rows whose decisions the bound leaves open, the median bound over the median top
        margin, and that margin."""
        out, redo, dl = decide(logits.double(), delta, eps_dev[:len(logits)] if per_example else None)
        gap = float(out[1].abs().median())
        return redo, float(dl.median()) / gap if gap > 0 else math.inf, gap

    def choose_bound(xb, logits, delta):
        """The probe: the bound (and its logits) that certifies the rest at the least expected cost, by
        the fraction of the probe's decisions each leaves open (those are recomputed in float64); None:
        float64 throughout.  The running bound is tried only when the sensitivity bound is within
        :data:`RUNNING_REACH` of the margins (it is a few times tighter, not orders of magnitude); it
        may also serve as a second stage, on the inputs the sensitivity bound leaves open only
        (``cascade``)."""
        c64 = FLOAT64_COST.get(torch.device(device).type, FLOAT64_COST["other"])
        open1, reach, gap = open_rows(logits, delta)
        r1 = float(open1.double().mean())
        options = [(1.0 + c64 * r1, 0, logits, delta, fast), (c64, 3, None, None, None)]
        if reach < DOMAIN_REACH:  # the bound over the inputs' range can be small enough: try it
            lo, hi = (float(v) for v in torch.aminmax(x))  # the probe runs only with more inputs
            dom_fw = DomainForward(fast, lo, hi, check=False) if math.isfinite(lo) and math.isfinite(hi) else None
            # its bound at the probe's predictions already says whether it can be small enough; only then
            # its own pass (the plain float32 one) runs on the probe
            if dom_fw is not None and float(dom_fw.D[logits.argmax(1)].amax(1).median()) < DOMAIN_REACH * gap:
                l0, d0 = dom_fw(xb)
                open0, reach0, _ = open_rows(l0, d0)
                if reach0 < DOMAIN_REACH:
                    both = float((open0 & open1).double().mean())
                    options.append((DOMAIN_COST + float(open0.double().mean()) + c64 * both, 4, l0, d0, dom_fw))
        if r1 > 0 and reach < RUNNING_REACH:
            running = model.running_error(norm)
            if running is not None:
                l2, d2 = running(xb)
                open2 = open_rows(l2, d2)[0]
                options.append((RUNNING_COST + c64 * float(open2.double().mean()), 1, l2, d2, running))
                both = float((open1 & open2).double().mean())
                options.append((1.0 + RUNNING_COST * r1 + c64 * both, 2, logits, delta, fast))
        best = min(options, key=lambda o: (o[0], o[1]))
        if best[1] == 2:  # the sensitivity bound first, the running bound on what it leaves open
            cascade[0] = running
        elif best[1] == 4:  # the bound over the inputs' range first, the sensitivity bound on the rest
            cascade[0] = fast
        if best[4] is None:  # float64 for the others; the probe's float32 logits stay (open ones redone)
            return logits, delta, None
        return best[2], best[3], best[4]

    def batches():
        # with float32 logits, a first batch of PROBE inputs tells whether the bound is narrow enough
        # to pay (else the rest runs in float64 directly); one more call per run, not per batch
        first = probe_n if use_fast else 0
        if first:
            yield 0, x[:first].to(device)
        for s, xb in stream(x[first:], batch_size, device):
            yield s + first, xb

    with torch.no_grad(), trusted_kernels():
        for s, xb in batches():
            if use_fast:
                logits, delta = fast_call[0](xb)
                if s == 0 and probe_n:
                    logits, delta, chosen = choose_bound(xb, logits, delta)
                    use_fast = chosen is not None
                    fast_call[0] = chosen
                keep(logits, delta, True)
            else:
                keep(*forward64(xb), False)
            if progress:
                progress(len(xb))
        flush()
        if cols[0]:
            pred, margin, radius, diffs, mask = (torch.cat(c) for c in cols)
            redo_all, fast_rows = torch.cat(redo_parts), torch.cat(fast_all)
        else:  # no inputs: empty columns of the right types
            pred = torch.zeros(0, dtype=torch.long, device=device)
            margin, radius = (torch.zeros(0, dtype=torch.float64, device=device) for _ in range(2))
            diffs = torch.zeros(0, m_cls, dtype=torch.float64, device=device)
            mask = torch.zeros(0, m_cls, dtype=torch.bool, device=device)
            redo_all = fast_rows = torch.zeros(0, dtype=torch.bool, device=device)
        idx_all = redo_all.nonzero().flatten().cpu()
        n_second = 0
        if cascade[0] is not None and len(idx_all):  # the running bound on the open inputs first
            still = []
            for s in range(0, len(idx_all), batch_size):
                idx = idx_all[s:s + batch_size]
                l2, d2 = cascade[0](x[idx].to(device))
                out, redo, _ = decide(l2, d2, eps_dev[idx.to(eps_dev.device)] if per_example else None)
                idx_d = idx.to(pred.device)
                for col, v in zip((pred, margin, radius, diffs, mask), out):
                    col[idx_d] = v
                still.append(idx[redo.cpu()])
                n_second += len(idx)
            idx_all = torch.cat(still)
            redo_all = torch.zeros_like(redo_all)
            redo_all[idx_all.to(redo_all.device)] = True
        # the float64 recomputation of the open decisions, in batches
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s:s + batch_size]
            l64, d64 = forward64(x[idx].to(device))
            out = global_radii(l64, K_rule, d64)
            idx = idx.to(pred.device)
            for col, v in zip((pred, margin, radius, diffs, mask), out):
                col[idx] = v
    dec32 = fast_rows & ~redo_all
    n_redo, n_fast = len(idx_all), int(fast_rows.sum())
    deltas = [torch.cat(dl_parts).cpu()] if n_fast else []
    pred, margin, radius, diffs, mask, dec32 = (t.cpu() for t in (pred, margin, radius, diffs, mask, dec32))
    Kj = K_rule.cpu()[pred]
    y = y.long().cpu()
    method_code = torch.where(dec32, 3, 0).to(torch.int64)  # METHODS: 0 global, 1 local, 2 estimate, 3 float32
    sound = torch.full((n,), bool(sound_K), dtype=torch.bool)
    if fast is not None:
        med = float(torch.cat(deltas).median()) if deltas else 0.0
        first = fast_call[0]
        how = ""
        if isinstance(first, DomainForward):
            how = f" (one bound for the whole input range [{first.lo:.6g}, {first.hi:.6g}])"
        elif first is not None and first is not fast:
            how = " by entry-wise running error analysis"
        again = "the per-example bound" if isinstance(first, DomainForward) else "entry-wise running error analysis"
        second = f"; {n_second} input(s) it left open bounded again by {again}" if n_second else ""
        notes.append(f"logits in float32 with a proven rounding-error bound{how} (median {med:.3g}){second}; "
                     f"{n_redo} of {n_fast} input(s) near a decision recomputed in float64"
                     + (f"; the bound exceeded most margins, so the other {n - n_fast} input(s) ran in float64"
                        if n_fast < n else ""))
    cert_at: dict[float, torch.Tensor] = {}
    if per_example:
        cert_at[-1.0] = certified_at(diffs, mask, Kj, eps_check) & sound
    for e in eps_list:
        cert_at[e] = certified_at(diffs, mask, Kj, e) & sound

    dom = model.effective_domain()
    if dom is not None:
        inside = inside_domain(x, dom, x)
        for k in cert_at:
            cert_at[k] &= inside
        radius = torch.where(inside, radius, torch.zeros_like(radius))
        notes.append(f"certificates hold for perturbations inside the input domain {describe_domain(dom)} "
                     "(products/normalisations are bounded there); "
                     f"{int((~inside).sum())} input(s) outside it are not certified")
    targets = eps_check if per_example else (max(eps_list) if eps_list else None)
    extra = (["local"] if method in ("local", "best") else []) + \
        (["crown"] if method in ("crown", "crown-ibp", "alpha-crown", "best") else [])
    for kind in extra:
        # with two extra methods each advances progress by half of the inputs' share
        part = progress if len(extra) == 1 or progress is None else _half(progress, n)
        if kind == "local":
            from lipverify.certify.local import local_certify

            lo_opts = dict(local_options or {})
            if str(lo_opts.get("jacobian", "interval")).startswith("linear") and "box" not in lo_opts:
                lo_opts["box"] = model.domain if model.domain is not None else default_box(x)
            found = local_certify(model, x, pred, diffs, mask, radius, targets, norm, cert_at, eps_list,
                                  per_example, progress=part, **lo_opts)
            notes.append(f"local bounds computed for {len(found)} inputs the global bound left uncertified")
            if lo_opts.get("box") is not None:
                notes.append("local constants with the linear relaxation of the Clarke Jacobian (Shi et al. 2022); "
                             "they hold on the ball intersected with the input domain "
                             f"{describe_domain(lo_opts['box'])}")
        else:
            from lipverify.certify.crown import crown_certify

            t_c = time.perf_counter()
            proven = torch.where(sound, radius, torch.zeros_like(radius))  # never start from an estimate
            stats: dict = {}
            deadline = None if alpha_budget is None else time.perf_counter() + float(alpha_budget)
            found, box = crown_certify(model, x, pred, proven, targets, norm, cert_at, eps_list, per_example,
                                       intermediate="ibp" if method == "crown-ibp" else "crown", progress=part,
                                       all_inputs=method == "best",
                                       alpha_steps=ALPHA_STEPS if method == "alpha-crown" else 0,
                                       alpha_deadline=deadline, stats=stats)
            if stats.get("alpha_cut"):
                notes.append(f"alpha-CROWN's slope optimisation stopped at its time budget ({alpha_budget:g} s): "
                             "the bounds after it are plain CROWN's (sound, possibly looser); raise "
                             "--alpha-budget to optimise them all")
            where = "the whole ball" if box is None else \
                f"the ball intersected with the input domain {describe_domain(box)}"
            label = {"crown-ibp": "CROWN-IBP", "alpha-crown": f"alpha-CROWN, {ALPHA_STEPS} steps"}.get(method, "CROWN")
            notes.append(f"linear bound propagation ({label}) for "
                         f"{len(found)} inputs{'' if method == 'best' else ' not yet certified'} ({time.perf_counter() - t_c:.3g} s); its "
                         f"certificates hold on {where}")
        for i, (r_new, snd, at) in found.items():
            if r_new > radius[i] or (snd and not bool(sound[i])):  # a sound radius beats an estimate
                radius[i] = r_new
                method_code[i] = (1 if snd else 2) if kind == "local" else 4
                sound[i] = snd
            for key, v in at.items():
                if v and snd:
                    cert_at[key][i] = True

    return summarise(norm, method, eps_list, per_example, pred, y, margin, radius, sound, method_code, cert_at,
                     notes, names, time.perf_counter() - t0)


def _half(progress, n):
    """``progress`` scaled by one half (two certification stages share the inputs' share)."""
    acc = [0.0]

    def adv(k):
        before = int(acc[0])
        acc[0] += k / 2
        if int(acc[0]) > before:
            progress(int(acc[0]) - before)
    return adv


def summarise(norm, method, eps_list, per_example, pred, y, margin, radius, sound, method_code, cert_at, notes,
              names, time_s) -> CertifyResult:
    """The :class:`CertifyResult` of per-input tensors (VRA, counts per method, median radius): tensor
    work only; per-input records are built when asked for (:attr:`CertifyResult.inputs`).  Also used to
    merge the shards of a ``torchrun`` job (:mod:`lipverify.certify.sharded`)."""
    n = len(pred)
    correct = pred == y
    keys = list(cert_at)
    primary = -1.0 if per_example else (max(eps_list) if eps_list else None)
    if primary is not None:
        primary_t = cert_at[primary].clone()
    else:
        primary_t = (radius > 0) & sound
    vra = {k: float((cert_at[k] & correct).double().mean()) for k in keys if k >= 0}
    vra_est = {}
    for e in (eps_list if method in ("local", "best") else []):
        est = (radius > e) & correct
        vra_est[e] = float(est.double().mean())
    # only correctly classified inputs count as certified: the counts add up to the VRA at ``primary``
    counts = {METHODS[k]: int(c)
              for k, c in enumerate(torch.bincount(method_code[primary_t & correct],
                                                   minlength=len(METHODS)).tolist()) if c}
    rc = radius[correct]
    med = float(rc.median()) if len(rc) else 0.0
    res = CertifyResult(n, norm, method, eps_list if not per_example else [], float(correct.double().mean()), vra,
                        None, counts, med, time_s, per_example, notes, vra_est,
                        pred=pred, label=y, margin=margin, radius=radius, sound=sound, method_code=method_code,
                        certified=primary_t, all_certified_at=dict(cert_at),
                        names=list(names) if names is not None else None,
                        stable_misclassified=int((primary_t & ~correct).sum()))
    if per_example:
        res.vra = {"per-example": float((cert_at[-1.0] & correct).double().mean())}
    return res


def _eps_short(k) -> str:
    """A radius in a one-line ``repr`` (4 significant digits; the keys stay exact floats)."""
    return k if isinstance(k, str) else f"{k:.4g}"
