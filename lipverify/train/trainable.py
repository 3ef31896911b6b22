"""A trainable GloRo view of any imported model (SPEC sections 3 and 7).

:class:`GloroBound` wraps the network being fine-tuned (the fx ``GraphModule`` of a
:class:`~lipverify.model.LipModel`, with the outside normalisation in front) together with its
Lipschitz graph, built with ``keep_params=True`` so that dense and convolution operators reference the
module's live parameters.  From the graph it computes, differentiably with respect to the weights:

* for every linear node (a merged affine chain, a residual ``I + W`` operator, ...) an estimate of its l2
  operator norm ``sigma = ||A u||`` with ``u`` a persistent power-iteration vector (a registered buffer:
  checkpointed, broadcast by DDP, warm-started, a few iterations per training step under ``no_grad``);
  operators without trainable weights get their sound norm once;
* the Lipschitz constant ``L(v)`` of every node, propagated as in
  :func:`lipverify.bounds.global_bound.propagate` (products along the graph, sums over residual
  branches, ``sqrt`` of sums of squares over concatenations);
* the margin constants ``K_ij = ||T_i - T_j||_2 * L(h)`` with ``T`` the rows of the last affine map
  (computed by a vector-Jacobian product of the live operator, so any merged tail works), or
  ``sqrt(2) L(f)`` when the logits are not an affine map of a nonlinear node.

These are *estimates* (power iteration approaches the norm from below): they drive the training loss.
Every number that lipverify reports as a certificate is recomputed afterwards with the sound method on
the exported model.

Dense and convolution weights are read live through the importer's ``keep_params`` option; a
row-normalised last layer (a parametrisation) and the scale of an eval-mode BatchNorm
(``weight / sqrt(running_var + eps)``, matched to the element-wise scale the importer measured) are
re-read from their modules.  Parameters that the graph does not reference live (a per-channel
multiplier measured as a constant element-wise scale, a weight the importer had to materialise, a 1-d
convolution) would change the function without changing the training bound; they are frozen, and
:func:`select_trainable` names them.  BatchNorm statistics stay frozen (the network is trained in eval
mode).
Additive biases (``.bias`` of dense, convolution and BatchNorm layers) never affect a Lipschitz constant
and stay trainable.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lipverify.bounds.global_bound import combine_lipschitz
from lipverify.graph import LipschitzGraph
from lipverify.graph.linear_ops import Chain, Conv, Dense, LinearOp, Residual, Scale, fold_chain

_BIAS_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                 nn.LayerNorm, nn.GroupNorm)


def iter_ops(op: LinearOp):
    """``op`` and every operator nested in it (chains, residual branches)."""
    yield op
    if isinstance(op, Chain):
        for o in op.ops:
            yield from iter_ops(o)
    elif isinstance(op, Residual):
        for o in op.branches:
            yield from iter_ops(o)


class _ParametrizedDense(Dense):
    """A :class:`Dense` whose weight is read from a module on every use (a parametrised weight such as
    the row-normalised last layer, which is recomputed from the underlying parameter)."""

    @property
    def weight(self):
        return self._source.weight

    @weight.setter
    def weight(self, value):  # Dense.__init__ / LinearOp.to assign it: keep reading from the module
        pass


def _patch_parametrized(graph: LipschitzGraph, net: nn.Module) -> list[nn.Module]:
    """Point dense operators built from parametrised ``nn.Linear`` weights (``--lln``) at the module."""
    mods = [m for m in net.modules() if isinstance(m, nn.Linear) and hasattr(m, "parametrizations")]
    patched = []
    for m in mods:
        with torch.no_grad():
            w = m.weight.detach()
        for n in graph.nodes:
            if n.kind != "linear":
                continue
            for o in iter_ops(n.op):
                if type(o) is Dense and o.weight.shape == w.shape and torch.equal(o.weight.to(w.dtype), w):
                    o.__dict__.pop("weight", None)
                    o.__class__ = _ParametrizedDense
                    o._source = m
                    patched.append(m)
    return patched


class _BatchNormScale(Scale):
    """A :class:`Scale` measured from an eval-mode BatchNorm, re-read from the module on every use
    (``weight / sqrt(running_var + eps)`` per channel), so that the BatchNorm scale is trainable."""

    @property
    def scale(self):
        bn = self._bn
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return s.view((-1,) + (1,) * (len(self.in_shape) - 1))

    @scale.setter
    def scale(self, value):
        pass


def _patch_batchnorm(graph: LipschitzGraph, net: nn.Module) -> list[nn.Module]:
    """Point element-wise scales measured from eval-mode BatchNorm layers at the modules."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
           and m.track_running_stats and isinstance(m.weight, nn.Parameter)]
    patched = []
    for bn in bns:
        with torch.no_grad():
            want = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        for n in graph.nodes:
            if n.kind != "linear":
                continue
            for o in iter_ops(n.op):
                if type(o) is not Scale or not o.in_shape or o.in_shape[0] != want.numel():
                    continue
                cs = o.channel_scale()
                if cs is not None and torch.allclose(cs.to(want.dtype), want, rtol=1e-6, atol=1e-9):
                    o.__dict__.pop("scale", None)
                    o.__class__ = _BatchNormScale
                    o._bn = bn
                    patched.append(bn)
    return patched


def live_parameters(graph: LipschitzGraph) -> list[nn.Parameter]:
    """Parameters that the graph's operators and activations read live (differentiable)."""
    seen, out = set(), []

    def add(p):
        if isinstance(p, nn.Parameter) and id(p) not in seen:
            seen.add(id(p))
            out.append(p)

    for n in graph.nodes:
        if n.kind == "linear":
            for o in iter_ops(n.op):
                if isinstance(o, _ParametrizedDense):
                    for p in o._source.parametrizations.weight.parameters():
                        add(p)
                elif isinstance(o, _BatchNormScale):
                    add(o._bn.weight)
                elif isinstance(o, (Dense, Conv)):
                    add(o.weight)
        elif n.kind == "activation":
            for c in (n.op.const_above, n.op.const_below):
                add(c)
    return out


def select_trainable(net: nn.Module, graph: LipschitzGraph) -> tuple[list[nn.Parameter], list[str]]:
    """Trainable parameters (live in the graph, or additive biases) and the names of frozen ones."""
    live = {id(p) for p in live_parameters(graph)}
    bias = set()
    for m in net.modules():
        if isinstance(m, _BIAS_MODULES) and isinstance(getattr(m, "bias", None), nn.Parameter):
            bias.add(id(m.bias))
    train, frozen = [], []
    for name, p in net.named_parameters():
        if id(p) in live or id(p) in bias:
            if p.requires_grad or id(p) in live:
                p.requires_grad_(True)
                train.append(p)
        else:
            if p.requires_grad:
                frozen.append(name)
            p.requires_grad_(False)
    return train, frozen


def _has_params(op: LinearOp) -> bool:
    for o in iter_ops(op):
        if isinstance(o, (_ParametrizedDense, _BatchNormScale)):
            return True
        if isinstance(o, (Dense, Conv)) and isinstance(o.weight, nn.Parameter):
            return True
    return False


def unit_vector(u: torch.Tensor) -> torch.Tensor:
    n = u.reshape(u.shape[0], -1).norm(dim=1).clamp_min(1e-30)
    return u / n.view((-1,) + (1,) * (u.dim() - 1))


def pairwise_row_distances(T: torch.Tensor) -> torch.Tensor:
    """``D_ij = ||T_i - T_j||_2`` for the rows of ``T`` (``(m, d)``), differentiable, zero diagonal."""
    sq = (T * T).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (T @ T.T)
    eye = torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
    return torch.sqrt(d2.clamp_min(1e-30)) * (1.0 - eye)


def operator_rows(op: LinearOp) -> torch.Tensor:
    """Rows of the matrix of ``op`` (``(out_dim, in_dim)``), differentiable in the live weights."""
    if type(op) is Dense and len(op.in_shape) == 1:
        return op.weight
    if isinstance(op, _ParametrizedDense) and len(op.in_shape) == 1:
        return op.weight
    m = op.out_dim
    dev = op._device()
    dt = next((o.weight.dtype for o in iter_ops(op) if isinstance(o, (Dense, Conv))), torch.float32)
    x0 = torch.zeros((m,) + op.in_shape, dtype=dt, device=dev, requires_grad=True)
    eye = torch.eye(m, dtype=dt, device=dev).reshape((m,) + op.out_shape)
    with torch.enable_grad():
        out = op.apply(x0)
        (rows,) = torch.autograd.grad(out, x0, grad_outputs=eye, create_graph=True)
    return rows.reshape(m, -1)


def single_conv(op: LinearOp) -> Conv | None:
    """``op`` as one 2-d convolution (itself, a chain that folds into one, or a residual ``x + conv``
    folded at the centre tap), or ``None``."""
    if isinstance(op, Chain):
        inner = fold_chain(op.ops)
        op = inner[0] if len(inner) == 1 else op
    if isinstance(op, Residual):
        op = op._as_single_conv()
    if isinstance(op, Conv) and not op.one_d:
        return op
    return None


def stack_convs(convs: list[Conv], dtype: torch.dtype) -> Conv:
    """``G`` convolutions of one geometry as one grouped convolution on ``G`` stacked inputs: channel
    block ``g`` of the output is ``convs[g]`` applied to channel block ``g`` of the input."""
    c0 = convs[0]
    w = torch.cat([c.weight.to(dtype) for c in convs], dim=0)
    shape = (c0.in_shape[0] * len(convs),) + tuple(c0.in_shape[1:])
    return Conv(w, shape, c0.stride, c0.padding, c0.dilation, c0.groups * len(convs))


class GloroBound(nn.Module):
    """Differentiable GloRo bound of ``net`` (see the module docstring).

    ``net``: the module being trained (raw inputs -> logits); ``graph``: its simplified Lipschitz graph
    built with ``keep_params=True`` from the same module.  ``power_iters``: iterations per call of
    :meth:`power_step`.
    """

    def __init__(self, net: nn.Module, graph: LipschitzGraph, power_iters: int = 2, seed: int = 0,
                 init_iters: int = 500):
        super().__init__()
        self.net = net
        self.graph = graph
        self.power_iters = int(power_iters)
        self.parametrized = _patch_parametrized(graph, net)
        self.batchnorms = _patch_batchnorm(graph, net)
        self.out = graph.output
        self.m = int(math.prod(graph.nodes[self.out].out_shape))
        self.live: list[int] = []
        self.const: dict[int, float] = {}
        self._groups: list[list[int]] | None = None  # power-iteration groups (_power_groups)
        g = torch.Generator().manual_seed(int(seed))
        dev = next((p.device for p in net.parameters()), torch.device("cpu"))
        for i, n in enumerate(graph.nodes):
            if n.kind != "linear":
                continue
            if _has_params(n.op):
                self.live.append(i)
                u = torch.randn((1,) + n.op.in_shape, generator=g)
                self.register_buffer(f"u{i}", unit_vector(u).to(dev))
            else:
                self.const[i] = float(n.op.norm("2").value)
        self.converge(tol=1e-5, max_iter=init_iters)

    # -- power iteration ----------------------------------------------------------------------------
    def _u(self, i: int) -> torch.Tensor:
        return getattr(self, f"u{i}")

    @torch.no_grad()
    def power_step(self, iters: int | None = None) -> None:
        """``u <- A^T A u / ||A^T A u||`` ``iters`` times for every live operator (in place).

        Operators that are one convolution of the same geometry (the blocks of a LiResNet, whose
        residual ``x + s beta K x`` folds into one kernel, or equal convolutions of a ConvNet) are
        iterated together: their kernels are stacked into one grouped convolution, so ``G`` blocks
        cost one convolution and one transposed convolution per iteration instead of ``G`` of each.
        Every vector is normalised on its own, so the iterates are those of the separate iterations.
        """
        k = self.power_iters if iters is None else int(iters)
        for group in self._power_groups():
            if len(group) == 1:
                i = group[0]
                op = self.graph.nodes[i].op
                u = self._u(i)
                for _ in range(k):
                    u = unit_vector(op.adjoint(op.apply(u.to(self._dtype(op)))).to(u.dtype))
                self._u(i).copy_(u)
                continue
            convs = [single_conv(self.graph.nodes[i].op) for i in group]
            stacked = stack_convs(convs, self._dtype(self.graph.nodes[group[0]].op))
            c = convs[0].in_shape[0]
            u = torch.cat([self._u(i) for i in group], dim=1)
            dt = u.dtype
            for _ in range(k):
                v = stacked.adjoint(stacked.apply(u.to(stacked.weight.dtype)))
                parts = [unit_vector(t) for t in v.to(dt).split(c, dim=1)]
                u = torch.cat(parts, dim=1)
            for i, t in zip(group, u.split(c, dim=1)):
                self._u(i).copy_(t)

    def _power_groups(self) -> list[list[int]]:
        """Live nodes grouped by the geometry of their single-convolution form (singletons otherwise);
        the geometry does not change in training, so the grouping is computed once."""
        if self._groups is not None:
            return self._groups
        groups: dict = {}
        for i in self.live:
            conv = single_conv(self.graph.nodes[i].op)
            key = ("solo", i) if conv is None else (
                tuple(conv.in_shape), tuple(conv.weight.shape), conv.stride, conv.padding,
                conv.dilation, conv.groups, self._dtype(self.graph.nodes[i].op))
            groups.setdefault(key, []).append(i)
        self._groups = list(groups.values())
        return self._groups

    @torch.no_grad()
    def converge(self, tol: float = 1e-5, max_iter: int = 500) -> int:
        """Run power iteration until every estimate changes by at most ``tol`` (relative)."""
        it = 0
        for i in self.live:
            op = self.graph.nodes[i].op
            u = self._u(i)
            prev = None
            for it_i in range(max_iter):
                v = op.apply(u.to(self._dtype(op)))
                s = float(v.norm())
                if prev is not None and abs(s - prev) <= tol * s:
                    break
                prev = s
                u = unit_vector(op.adjoint(v).to(u.dtype))
            it = max(it, it_i + 1)
            self._u(i).copy_(u)
        return it

    @staticmethod
    def _dtype(op) -> torch.dtype:
        for o in iter_ops(op):
            if isinstance(o, (Dense, Conv)):
                return o.weight.dtype
        return torch.float32

    def sigma(self, i: int) -> torch.Tensor:
        """``||A u||`` for the stored unit vector ``u`` of node ``i`` (differentiable in the weights)."""
        op = self.graph.nodes[i].op
        return op.apply(self._u(i).to(self._dtype(op))).norm()

    # -- bounds -------------------------------------------------------------------------------------
    def node_lipschitz(self, skip_output: bool = True) -> list:
        """``L(v)`` for every node (tensors where they depend on weights, floats otherwise)."""
        nodes = self.graph.nodes
        L: list = [None] * len(nodes)
        for i, n in enumerate(nodes):
            k = n.kind
            if k == "input":
                L[i] = 1.0
                continue
            ins = [L[j] for j in n.inputs]
            if k == "linear":
                if skip_output and i == self.out:
                    continue
                c = self.sigma(i) if i in self.live else self.const[i]
                L[i] = combine_lipschitz(n, ins, c)
            else:
                L[i] = combine_lipschitz(n, ins)
        return L

    def margin_constants(self) -> torch.Tensor:
        """``K`` (``(m, m)``, zero diagonal), differentiable in the weights; an estimate."""
        out = self.graph.nodes[self.out]
        if out.kind == "linear":
            L = self.node_lipschitz(skip_output=True)
            Lh = L[out.inputs[0]]
            T = operator_rows(out.op)
            K = pairwise_row_distances(T.float() if T.dtype != torch.float64 else T) * Lh
        else:
            L = self.node_lipschitz(skip_output=False)
            eye = torch.eye(self.m, device=self._device())
            K = math.sqrt(2.0) * L[self.out] * (1.0 - eye)
        if not isinstance(K, torch.Tensor):
            K = torch.as_tensor(K)
        return K

    @torch.no_grad()
    def global_estimate(self) -> float:
        """Estimate of the global l2 Lipschitz constant ``L(f)`` from the current vectors."""
        L = self.node_lipschitz(skip_output=False)
        return float(L[self.out])

    def _device(self):
        return next((b.device for b in self.buffers()), torch.device("cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.reshape(out.shape[0], -1)


def build_trainable_graph(gm: nn.Module, input_shape, normalizer=None, device="cpu") -> LipschitzGraph:
    """The simplified Lipschitz graph of ``gm`` (with ``normalizer`` folded in front), whose dense and
    convolution operators reference ``gm``'s live parameters."""
    from lipverify.graph.simplify import simplify
    from lipverify.importers.fx import build_graph
    from lipverify.importers.normalize import prepend_normalizer

    g = torch.Generator().manual_seed(0)
    example = torch.rand((2,) + tuple(input_shape), generator=g).to(device)
    graph = build_graph(gm, tuple(input_shape), "fine-tuned model", example=example, keep_params=True)
    if normalizer is not None:
        graph = prepend_normalizer(graph, normalizer, tuple(input_shape))
    return simplify(graph)


def check_graph(net: nn.Module, graph: LipschitzGraph, input_shape, device, rtol: float = 1e-4) -> float:
    """The graph must compute the network's function (as :meth:`LipModel.check_graph`)."""
    from lipverify.errors import LipverifyError

    g = torch.Generator().manual_seed(1)
    x = torch.rand((3,) + tuple(input_shape), generator=g).to(device)
    with torch.no_grad():
        want = net(x).reshape(3, -1).double()
        got = graph.forward(x).reshape(3, -1).double()
    diff = float((want - got).abs().max())
    if not diff <= rtol * max(1.0, float(want.abs().max())):
        raise LipverifyError(f"internal error: the trainable Lipschitz graph differs from the model by {diff:.3g}")
    return diff
