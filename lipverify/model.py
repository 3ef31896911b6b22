"""``LipModel``: an imported classifier together with its Lipschitz graph.

This is the object the Python API hands out (``lipverify.load(path)``).  Analyses are methods that
delegate to the pure functions in :mod:`lipverify.bounds` and friends.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn as nn

from lipverify.bounds.global_bound import (
    TAIL_MAX_ENTRIES,
    check_margin_size,
    margin_constants,
    propagate,
    property_constants,
    tail_matrix,
    tail_size,
)
from lipverify.errors import LipverifyError, UserInputError
from lipverify.graph import LipschitzGraph
from lipverify.results import BoundsReport, LayerRow, MarginSummary, ValueWithMethod


@contextlib.contextmanager
def no_tf32():
    """Bound arithmetic never runs with TF32 matmuls (they silently drop mantissa bits)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class LipModel:
    """An imported classifier: ``module`` maps raw inputs (the user's pixel space) to logits and
    ``graph`` is the same function as a typed Lipschitz graph."""

    def __init__(self, module: nn.Module, graph: LipschitzGraph, input_shape, name: str, fidelity=None,
                 notes=None):
        self.module = module
        for m in module.modules():
            m.training = False
        self.graph = graph
        self.input_shape = tuple(input_shape)
        self.name = name
        self.fidelity = fidelity
        self.notes = list(notes or [])
        self.device = torch.device("cpu")
        self._cache: dict = {}
        #: input box ``(lo, hi)`` the domain-dependent constants hold on (products, normalisations);
        #: None: [0, 1] (the data range of images) for graphs that need one.
        self.domain = None

    def set_domain(self, lo, hi) -> "LipModel":
        """Declare the input domain ``[lo, hi]`` (floats or tensors of the input shape)."""
        self.domain = (lo, hi)
        self._cache.clear()
        return self

    def effective_domain(self):
        """The domain the bounds use: ``self.domain``, or ``(0, 1)`` when the graph needs one; None when
        no constant of this graph depends on the domain."""
        if not self.graph.domain_nodes():
            return None
        return self.domain if self.domain is not None else (0.0, 1.0)

    # -- basics -----------------------------------------------------------------------------------
    def to(self, device) -> "LipModel":
        self.device = torch.device(device)
        self.module.to(self.device)
        self.graph.to(device=self.device)
        self._cache.clear()
        return self

    @property
    def n_classes(self) -> int:
        n = 1
        for s in self.graph.nodes[self.graph.output].out_shape:
            n *= s
        return n

    def __call__(self, x) -> torch.Tensor:
        """Logits ``(B, m)`` of the model for raw inputs ``(B, *input_shape)`` (tensor or NumPy array);
        float64 inputs are evaluated by the float64 copy (:meth:`module_double`), as given."""
        if not isinstance(x, torch.Tensor):
            from lipverify.arguments import as_inputs

            x = as_inputs(x, None, self.input_shape)[0]
        first = next(self.module.parameters(), None)
        if x.dtype == torch.float64 and first is not None and first.dtype != torch.float64:
            out = self.module_double()(x.to(self.device))
        else:
            out = self.module(x.to(self.device))
        return out.reshape(out.shape[0], -1)

    def check_graph(self, n: int = 3, rtol: float = 1e-4) -> float:
        """Check that the Lipschitz graph reproduces the module; raises if it does not."""
        g = torch.Generator().manual_seed(1)
        x = torch.rand((n,) + self.input_shape, generator=g).to(self.device)
        with torch.no_grad():
            want = self(x).double()
            got = self.graph.forward(x).reshape(n, -1).double()
        diff = float((want - got).abs().max())
        scale = max(1.0, float(want.abs().max()))
        if not diff <= rtol * scale:
            raise LipverifyError(f"internal error: the Lipschitz graph differs from the model by {diff:.3g}")
        return diff

    def module_double(self) -> nn.Module:
        """A float64 copy of the model (certificates use float64 logits)."""
        if "module64" not in self._cache:
            import copy

            m = copy.deepcopy(self.module).to(self.device, torch.float64)
            for sub in m.modules():
                sub.training = False
            self._cache["module64"] = m
        return self._cache["module64"]

    def certify(self, x, y, eps=(), norm="2", method: str = "global", *, clip="auto", precision: str = "auto",
                batch_size: int | None = None, progress=None, names=None, local_options: dict | None = None,
                alpha_budget: float | None = None):
        """Certified radius per input: the largest ``r`` with a proof that no perturbation of norm
        ``<= r`` changes the prediction (see :func:`lipverify.certify.rules.certify`).

        Same defaults as ``lipverify certify``.

        Parameters
        ----------
        x, y:
            Inputs ``(N, *input_shape)`` (NumPy array or torch tensor, floating dtype) and integer
            labels ``(N,)`` (:func:`lipverify.arguments.as_inputs`).
        eps:
            Radii for the verified-robust accuracy: a float, a list/tuple, ``"8/255,16/255"``
            (:func:`lipverify.arguments.parse_eps`), or a torch tensor ``(N,)`` of per-example radii (a
            NumPy array is always a list of radii).
        norm:
            ``2``/``"2"``/``"l2"``/``"L2"`` or ``inf``/``"inf"``/``"linf"``/``"l_inf"``
            (:func:`lipverify.arguments.parse_norm`).
        method:
            ``"global"`` (the GloRo rule with the global margin constants) or ``"local"`` (global first,
            then local constants by bisection for the inputs it leaves uncertified).
        clip:
            The input domain the constants of products and normalisations hold on.  ``"auto"``: the
            model's domain (:meth:`set_domain`, else ``[0, 1]`` for graphs that need one), as the
            command without ``--clip``; ``(lo, hi)`` or ``"LO,HI"``: that domain (it stays set, like
            :meth:`set_domain`); ``None``/``"none"``: no domain, refused for graphs that need one.
            Certificates of other graphs hold on the whole ball, so the box changes nothing there.
        precision, batch_size, progress, names, local_options, alpha_budget:
            See :func:`lipverify.certify.rules.certify` (``progress(k)`` is advanced by
            :func:`lipverify.certify.rules.progress_total` in all).

        Returns
        -------
        :class:`lipverify.results.CertifyResult` (float eps keys: ``res.vra[0.5]``).

        Warnings
        --------
        Bad arguments raise :class:`~lipverify.errors.UserInputError`: integer (uint8) ``x`` (scale
        it by 1/255), wrong shapes, float labels, an unknown norm, negative eps, an invalid box.
        """
        from lipverify.arguments import as_inputs, parse_norm
        from lipverify.certify import certify

        norm = parse_norm(norm)
        x, y = as_inputs(x, y, self.input_shape, self.n_classes)
        self._certify_domain(clip)
        return certify(self, x, y, eps=eps, norm=norm, method=method, batch_size=batch_size, progress=progress,
                       names=names, local_options=local_options, precision=precision, alpha_budget=alpha_budget)

    def _certify_domain(self, clip) -> None:
        """Apply ``clip`` of :meth:`certify` to the model's domain."""
        from lipverify.arguments import parse_box

        if isinstance(clip, str) and clip.strip().lower() == "auto":
            return
        if clip is None or isinstance(clip, str) and clip.strip().lower() == "none":
            if self.graph.domain_nodes():
                raise UserInputError("this model's constants (products/normalisations) hold on a bounded input "
                                     "domain only: give clip=(lo, hi) or leave clip='auto' ([0, 1])")
            return
        lo, hi = parse_box(clip) if isinstance(clip, str) else clip
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
            self.set_domain(lo, hi)
            return
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise UserInputError(f"clip must be (lo, hi) with finite lo < hi, got {clip!r}")
        same = self.domain is not None and not any(isinstance(v, torch.Tensor) for v in self.domain) \
            and (float(self.domain[0]), float(self.domain[1])) == (lo, hi)
        if not same:
            self.set_domain(lo, hi)

    def certify_properties(self, x, properties, lower, upper, norm="inf", method: str = "global", *,
                           batch_size: int = 256, progress=None, names=None, local_options: dict | None = None):
        """Prove output properties on boxes (VNN-LIB specifications): ``properties[i]`` on
        ``[lower[i], upper[i]]`` around ``x[i]`` (see
        :func:`lipverify.certify.properties.certify_properties`).

        ``x``, ``lower``, ``upper``: NumPy arrays or tensors ``(N, *input_shape)`` (floating dtype);
        ``norm``: any spelling of :func:`lipverify.arguments.parse_norm` (default ``inf``: boxes);
        ``method``: ``"global"`` or ``"local"``.  Returns a :class:`lipverify.results.CertifyResult`
        with per-example eps (``vra``: the fraction of specifications proven).

        Warnings
        --------
        Certificates hold on the boxes only.  Bad arguments raise
        :class:`~lipverify.errors.UserInputError`.
        """
        from lipverify.arguments import as_inputs, parse_norm
        from lipverify.certify.properties import certify_properties

        norm = parse_norm(norm)
        x, _ = as_inputs(x, None, self.input_shape)
        lower = torch.as_tensor(lower, dtype=torch.float64) if not isinstance(lower, torch.Tensor) else lower
        upper = torch.as_tensor(upper, dtype=torch.float64) if not isinstance(upper, torch.Tensor) else upper
        return certify_properties(self, x, properties, lower, upper, norm=norm, method=method, batch_size=batch_size,
                                  progress=progress, names=names, local_options=local_options)

    def attack(self, x, y, eps=(), norm="2", *, clip="auto", strength="standard", batch_size: int = 256,
               seed: int = 0, max_eps=None, progress=None, names=None, index_offset: int = 0):
        """Adversarial radius per input and robust accuracy per eps (see
        :func:`lipverify.attacks.evaluate.evaluate_robustness`); every point is judged by the float64
        model.  Same defaults as ``lipverify attack``.

        Parameters
        ----------
        x, y:
            Inputs ``(N, *input_shape)`` (NumPy array or torch tensor, floating dtype; converted to the
            model's dtype) and integer labels ``(N,)``.
        eps:
            Radii for the robust accuracy: a float, a list/tuple or ``"8/255,16/255"``.
        norm:
            Any spelling of :func:`lipverify.arguments.parse_norm` (``2``, ``"l2"``, ``"inf"``, ...).
        clip:
            The box every adversarial point stays in.  ``"auto"`` (default, as the command):
            ``[0, 1]`` when every input lies in ``[0, 1]``, else no box
            (:func:`lipverify.arguments.default_box`); ``(lo, hi)`` floats or ``"LO,HI"``; ``(lo, hi)``
            tensors of the shape of ``x``: a box per input; ``None`` or ``"none"``: no box.
        strength:
            ``"fast"``, ``"standard"`` or ``"thorough"`` (:mod:`lipverify.attacks.strength`).
        batch_size, seed, max_eps, progress, names, index_offset:
            See :func:`lipverify.attacks.evaluate.evaluate_robustness` (results depend on
            ``batch_size`` and ``seed``: the command's defaults are 256 and 0).

        Returns
        -------
        :class:`lipverify.attacks.evaluate.RobustnessReport` (``robust_accuracy[0.5]``: float keys).

        Warnings
        --------
        Attacks give upper bounds on the robust radius; they never prove robustness.  Bad arguments
        raise :class:`~lipverify.errors.UserInputError` (uint8 ``x``: scale it by 1/255).
        """
        from lipverify.arguments import as_inputs, parse_norm, resolve_box
        from lipverify.attacks.evaluate import evaluate_robustness

        norm = parse_norm(norm)
        x, y = as_inputs(x, y, self.input_shape, self.n_classes)
        param = next(self.module.parameters(), None)
        if param is not None and param.is_floating_point() and x.dtype != param.dtype:
            x = x.to(param.dtype)
        clip = resolve_box(clip, x)
        x = x.to(self.device)
        if clip is not None and isinstance(clip[0], torch.Tensor):
            clip = (clip[0].to(self.device), clip[1].to(self.device))
        return evaluate_robustness(self.module, x, y.to(self.device), eps, norm=norm, clip=clip, strength=strength,
                                   batch_size=batch_size, seed=seed, forward64=self.module_double(),
                                   max_eps=max_eps, progress=progress, names=names, index_offset=index_offset)

    def audit(self, x, y, eps=None, norm="2", *, clip="auto", strength="standard", method: str = "local",
              steps="all", time_budget="auto", seed: int = 0, progress=None, on_step=None):
        """The two-sided audit of ``lipverify audit`` (same defaults): sound bounds and certificates next
        to lower bounds and attacks (:func:`lipverify.report.audit.run_audit`).

        Parameters
        ----------
        x, y:
            Inputs ``(N, *input_shape)`` and integer labels ``(N,)`` (NumPy arrays or torch tensors).
            The command audits the first 200 inputs of ``--data`` by default; here all of ``x``.
        eps:
            Radii to report (a float, a list, ``"2/255,8/255"``); None: ``0.1, 0.3, 1`` for l2,
            ``1/255, 2/255, 8/255`` for l_inf (:func:`lipverify.report.audit.default_eps`).
        norm:
            Any spelling of :func:`lipverify.arguments.parse_norm`.
        clip:
            As :meth:`attack`: ``"auto"`` is ``[0, 1]`` when every input lies in it, else no box; the
            box is also the domain of the certificates (:meth:`set_domain`), as in the command.
        strength, method, steps, time_budget, seed:
            As the command's ``--strength`` (``"auto"``, ``"fast"``, ``"standard"``, ``"thorough"``),
            ``--method`` (``"global"``: no local work), ``--steps`` (``"all"`` or e.g.
            ``"attack,lower"``), ``--time-budget`` (seconds, ``"3m"``, ``"auto"`` or None for no limit)
            and ``--seed``.
        progress, on_step:
            ``progress``: None, a ``progress(message)`` callable or a
            :class:`lipverify.report.progress.Stages`; ``on_step(result)`` receives the partial
            :class:`~lipverify.report.audit.AuditResult` after every step.

        Returns
        -------
        :class:`lipverify.report.audit.AuditResult`; ``res.headline`` is the one-line answer,
        :func:`lipverify.report.files.render` gives the report files.

        Warnings
        --------
        Bad arguments raise :class:`~lipverify.errors.UserInputError`.  A time budget reduces the
        attack strength, the lower-bound effort, the local certificates and possibly the number of
        inputs; ``res.notes`` says what was reduced.
        """
        from lipverify.arguments import as_inputs, parse_eps, parse_norm, resolve_box
        from lipverify.report.audit import default_eps, parse_steps, parse_time_budget, run_audit

        norm = parse_norm(norm)
        x, y = as_inputs(x, y, self.input_shape, self.n_classes)
        eps_list = sorted(set(parse_eps(eps))) if eps is not None else []
        eps_list = eps_list or default_eps(norm)
        box = resolve_box(clip, x)
        if box is not None:
            self.set_domain(*box)
        return run_audit(self, x, y, eps_list, norm=norm, clip=box, seed=seed, strength=strength,
                         progress=progress, method=method, steps=parse_steps(steps),
                         time_budget=parse_time_budget(time_budget), on_step=on_step)

    # -- bounds -----------------------------------------------------------------------------------
    def node_constants(self, norm: str = "2", method: str = "sound"):
        key = ("consts", norm, method)
        if key not in self._cache:
            with no_tf32(), torch.no_grad():
                self._cache[key] = propagate(self.graph, norm, method, domain=self.effective_domain())
        return self._cache[key]

    def margin_constants(self, norm: str = "2", method: str = "sound"):
        """``K`` (float64, m x m) bounding the Lipschitz constants of the logit margins."""
        key = ("margin", norm, method)
        if key not in self._cache:
            check_margin_size(math.prod(self.graph.nodes[self.graph.output].out_shape), self.name)  # tail: as large
            with no_tf32(), torch.no_grad():
                small = tail_size(self.graph) <= TAIL_MAX_ENTRIES
                self._cache[key] = margin_constants(self.graph, self.node_constants(norm, method), norm,
                                                    tail=self.tail_matrix() if small else None)
        return self._cache[key]

    def local_constants(self, x, eps, norm="2", *, jacobian: str = "auto", clip="auto", rows=None):
        """Sound local margin constants ``K_ij(x_b, eps)`` on the balls around ``x`` (float64).

        ``K[b, i, j]`` bounds the Lipschitz constant of the margin ``f_i - f_j`` on ``B_p(x_b, eps_b)``
        (intersected with the input domain where a linear relaxation is used), the minimum of the masked
        operator-norm product (Huang et al. 2021) and the Clarke-Jacobian bounds chosen by ``jacobian``
        (see :func:`lipverify.bounds.local.local_margin_constants`): ``"auto"`` (default) the linear
        relaxation (Shi et al. 2022) with CROWN's pre-activation bounds where CROWN applies and is
        affordable, else interval bounds; ``"interval"``, ``"linear"``, ``"linear-refined"``, ``"none"``.

        ``x``: inputs ``(N, *input_shape)``; ``eps``: a float or ``(N,)`` radii; ``norm`` as
        :meth:`certify`; ``clip``: the input domain (``"auto"``: the model's, else ``[0, 1]`` when every
        input lies in it, else none); ``rows``: class indices ``(N,)``: the Jacobian bounds only for the
        pairs ``(rows_b, j)`` (the others keep the masked-norm bound).  Returns a
        :class:`lipverify.bounds.local.LocalBoundResult`.

        Warnings
        --------
        The constants hold only inside the balls they were computed for.  ``"linear-refined"`` costs
        seconds per input on convolutional networks.
        """
        from lipverify.arguments import AUTO, as_inputs, parse_norm, resolve_box
        from lipverify.bounds.local import local_margin_constants

        norm = parse_norm(norm)
        x, _ = as_inputs(x, None, self.input_shape, self.n_classes)
        x = x.to(self.device, torch.float64)
        auto = isinstance(clip, str) and clip.strip().lower() == AUTO
        box = self.domain if auto and self.domain is not None else resolve_box(clip, x)
        dom = box if box is not None else self.effective_domain()
        if rows is not None:
            rows = torch.as_tensor(rows, device=self.device).long().reshape(-1)
        eps_t = torch.as_tensor(eps, dtype=torch.float64, device=self.device)
        if bool((eps_t < 0).any()) or not bool(torch.isfinite(eps_t).all()):
            raise UserInputError(f"eps must be finite and non-negative, got {eps!r}")
        with no_tf32():
            return local_margin_constants(self.graph, x, eps_t, norm, domain=dom, rows=rows, jacobian=jacobian,
                                          box=box)

    def rounded_forward(self, norm: str = "2", dtype=torch.float32):
        """The graph evaluated in ``dtype`` with a proven bound on the logits' rounding error
        (:class:`lipverify.bounds.rounding.RoundedForward`; ``supported`` false when the graph has a step
        without a rounding model)."""
        key = ("rounded", str(norm), dtype)
        if key not in self._cache:
            from lipverify.bounds.rounding import RoundedForward

            self._cache[key] = RoundedForward(self.graph, self.node_constants(str(norm)), str(norm), dtype,
                                              device=self.device)
        return self._cache[key]

    def running_error(self, norm: str = "2"):
        """The float32 graph with the entry-wise running error bound
        (:class:`lipverify.bounds.running_error.RunningError`), or None when the graph has a step
        without a rounding model."""
        key = ("running", str(norm))
        if key not in self._cache:
            from lipverify.bounds.running_error import RunningError

            rf = self.rounded_forward(norm, torch.float32)
            self._cache[key] = RunningError(rf) if rf.supported else None
        return self._cache[key]

    def tail_matrix(self):
        """The affine tail ``(T, h)`` of the graph (see :func:`lipverify.bounds.global_bound.tail_matrix`)."""
        if "tail" not in self._cache:
            with no_tf32(), torch.no_grad():
                self._cache["tail"] = tail_matrix(self.graph)
        return self._cache["tail"]

    def property_constants(self, C, norm: str = "2", method: str = "sound"):
        """``K[k]`` bounding the Lipschitz constant of ``C_k . f`` for each row of ``C`` (float64)."""
        with no_tf32(), torch.no_grad():
            return property_constants(self.graph, self.node_constants(norm, method), norm,
                                      torch.as_tensor(C, dtype=torch.float64), tail=self.tail_matrix())

    def bounds(self, norm="2", method: str = "sound") -> BoundsReport:
        """Per-layer constants, the global bound and the margin constants.

        ``norm``: any spelling of :func:`lipverify.arguments.parse_norm`.  ``method="sound"``: proven
        upper bounds (float64).  ``method="power"``: power-iteration estimates for linear operators
        (labelled ``sound: false``).  Each :class:`~lipverify.results.LayerRow` carries the node's own
        constant and ``cumulative``, the sound bound from the input to the node's output.

        Warnings
        --------
        LipSDP and ECLipsE are not methods of this call: ``method="lipsdp"``/``"eclipse"``/
        ``"eclipse-fast"`` raise :class:`~lipverify.errors.UserInputError` saying how to call them
        (:func:`lipverify.bounds.lipsdp_graph.lipsdp_report` and
        :func:`~lipverify.bounds.lipsdp_graph.chain_report`, or ``lipverify bounds --method lipsdp``).
        """
        from lipverify.arguments import parse_norm

        norm = parse_norm(norm)
        if method == "lipsdp":
            raise UserInputError("LipSDP is not a method of LipModel.bounds: call "
                                 "lipverify.bounds.lipsdp_graph.lipsdp_report(model, norm='2') (l2 only; the "
                                 "same as 'lipverify bounds --method lipsdp')")
        if method in ("eclipse", "eclipse-fast"):
            raise UserInputError(f"{method} is not a method of LipModel.bounds: call "
                                 f"lipverify.bounds.lipsdp_graph.chain_report(model, norm='2', method={method!r}) "
                                 f"(l2 only; the same as 'lipverify bounds --method {method}')")
        if method not in ("sound", "power"):
            raise UserInputError(f"method must be 'sound' or 'power' (LipSDP: "
                                 f"lipverify.bounds.lipsdp_graph.lipsdp_report), got {method!r}")
        t0 = time.perf_counter()
        consts = self.node_constants(norm, method)
        mc = self.margin_constants(norm, method)
        rows = []
        for c in consts:
            if c.kind == "input":
                continue
            cum = None if c.cumulative is None else float(c.cumulative.value)
            if c.constant is None:
                rows.append(LayerRow(c.name, c.op, c.kind, c.in_shape, c.out_shape, None,
                                     "combines branches (bounded in the global propagation)", True, cum))
            else:
                rows.append(LayerRow(c.name, c.op, c.kind, c.in_shape, c.out_shape, c.constant.value,
                                     c.constant.method, c.constant.sound, cum))
        out = consts[self.graph.output].cumulative
        gmethod = ("product of layer constants along the graph (sums over residual branches)"
                   if method == "sound" else "product of power-iteration estimates (not a bound)")
        dom = self.effective_domain()
        notes = list(self.notes)
        if dom is not None:
            from lipverify.bounds.global_bound import describe_domain

            gmethod += f"; holds on the input domain {describe_domain(dom)}"
            notes.append(f"products/normalisations bounded with interval bounds on the input domain "
                         f"{describe_domain(dom)}" + (" (the default; set --clip)" if self.domain is None else "")
                         + ": the bound and certificates hold for inputs inside it only")
        overflow_at = next((r.name for r in rows if r.overflow), None)
        if overflow_at is not None:
            notes.append(f"the bound overflows float64 (above 1.8e308) at layer {overflow_at}: from there on every "
                         "running bound, the global bound and the margin constants are infinite, which proves "
                         "nothing (typical of products such as squeeze-excitation gates bounded over the whole "
                         "input domain; a smaller --clip box or local bounds may help)")
        return BoundsReport(
            model=self.name, norm=norm, method=method, input_shape=self.input_shape,
            n_classes=self.n_classes, layers=rows,
            global_bound=ValueWithMethod(out.value, gmethod, out.sound),
            margin=MarginSummary(mc.K.tolist(), mc.method, mc.sound),
            fidelity=self.fidelity, notes=notes, time_s=time.perf_counter() - t0,
            domain=None if dom is None else [_plain(v) for v in dom],
        )


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() > 1 else float(v)
    return float(v)
