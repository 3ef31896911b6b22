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
from lipverify.errors import LipverifyError
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, m)`` of the model for raw inputs ``(B, *input_shape)``."""
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

    def certify(self, x, y, eps=(), norm: str = "2", method: str = "global", **kw):
        """Certified radius per input (see :func:`lipverify.certify.certify`)."""
        from lipverify.certify import certify

        return certify(self, x, y, eps=eps, norm=norm, method=method, **kw)

    def certify_properties(self, x, properties, lower, upper, norm: str = "inf", method: str = "global", **kw):
        """Prove output properties on boxes (see :func:`lipverify.certify.properties.certify_properties`)."""
        from lipverify.certify.properties import certify_properties

        return certify_properties(self, x, properties, lower, upper, norm=norm, method=method, **kw)

    def attack(self, x, y, eps=(), norm: str = "2", clip=None, strength: str = "standard", **kw):
        """Adversarial radius per input and robust accuracy per eps (see
        :func:`lipverify.attacks.evaluate.evaluate_robustness`); points judged by the float64 model."""
        from lipverify.attacks.evaluate import evaluate_robustness

        x = x.to(self.device)
        if clip is not None and isinstance(clip[0], torch.Tensor):
            clip = (clip[0].to(self.device), clip[1].to(self.device))
        return evaluate_robustness(self.module, x, y.to(self.device), eps, norm=norm, clip=clip, strength=strength,
                                   forward64=self.module_double(), **kw)

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

    def bounds(self, norm: str = "2", method: str = "sound") -> BoundsReport:
        """Per-layer constants, the global bound and the margin constants.

        ``method="sound"``: proven upper bounds (float64).  ``method="power"``: power-iteration
        estimates for linear operators (labelled ``sound: false``).
        """
        norm = str(norm)
        if norm not in ("2", "inf"):
            raise ValueError("norm must be '2' or 'inf'")
        if method not in ("sound", "power"):
            raise ValueError("method must be 'sound' or 'power'")
        t0 = time.perf_counter()
        consts = self.node_constants(norm, method)
        mc = self.margin_constants(norm, method)
        rows = []
        for c in consts:
            if c.kind == "input":
                continue
            if c.constant is None:
                rows.append(LayerRow(c.name, c.op, c.kind, c.in_shape, c.out_shape, None,
                                     "combines branches (bounded in the global propagation)", True))
            else:
                rows.append(LayerRow(c.name, c.op, c.kind, c.in_shape, c.out_shape, c.constant.value,
                                     c.constant.method, c.constant.sound))
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
