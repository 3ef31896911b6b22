"""Turn a ``torch.fx.GraphModule`` (from onnx2torch or from tracing a torch module) into a
:class:`~lipverify.graph.LipschitzGraph`.

The walk runs the fx graph once on an example batch, which folds everything that does not depend
on the input (constants, shape arithmetic) to values.  Each input-dependent node is then classified:

* affine ops become :mod:`lipverify.graph.linear_ops` objects (dense, conv, element-wise scale, and
  coordinate selections — reshape, transpose, slice, pad, ... — whose index map is *measured* by
  pushing exact integers through the op);
* element-wise nonlinearities become activations with their slope range;
* max pooling, residual adds/subs of two branches and concatenations become their own nodes;
* a Softmax/LogSoftmax that produces the output is stripped with a note.

Anything else is collected, and all unsupported nodes are reported together in one
:class:`~lipverify.errors.UnsupportedOpError` — lipverify never assumes a constant for an op it does
not know.

Op tables live in :mod:`lipverify.importers.optable`; aten graphs are first normalised by
:mod:`lipverify.importers.aten`.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lipverify.errors import UnsupportedOpError, UserInputError
from lipverify.graph import (
    Activation,
    Attention,
    LipschitzGraph,
    MaxPool,
    Node,
    Normalization,
    make_activation,
    minmax,
)
from lipverify.graph.linear_ops import Chain, Conv, ConvTranspose, Dense, LinearOp, Scale, probe_select
from lipverify.importers.optable import (
    ACT_FUNCS,
    ACT_METHODS,
    ACT_MODULES,
    MEAN_FUNCS,
    ONNX_ACT_MODULES,
    SELECT_FUNC_NAMES,
    SELECT_FUNCS,
    SELECT_METHODS,
    SELECT_MODULES,
    SOFTMAX_OPS,
    SUM_FUNCS,
    binary_kind,
    is_neg,
    op_name,
)

try:  # MinMax lives in the model zoo; the importer recognises it as a graph primitive
    from lipverify.models.layers import MinMax as _MinMax
except Exception:  # pragma: no cover - zoo not importable
    _MinMax = None
try:  # so do the l-inf distance layers and their mean shift
    from lipverify.models.linf_dist import LinfDist as _LinfDist
    from lipverify.models.linf_dist import MeanShift as _MeanShift
except Exception:  # pragma: no cover
    _LinfDist = _MeanShift = None


TRACE_BATCH = 2


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps torch.nn built-ins and lipverify's MinMax as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _MinMax is not None and isinstance(m, _MinMax):
            return True
        if qkv_attention(m) is not None:
            return True
        if _LinfDist is not None and isinstance(m, (_LinfDist, _MeanShift)):
            return True
        return super().is_leaf_module(m, qualname)


def qkv_attention(m: nn.Module) -> Attention | None:
    """The :class:`Attention` of a ViT-style self-attention block with a fused ``qkv`` projection (timm's
    ``Attention``: ``qkv``/``proj`` linears, ``num_heads``, ``scale = head_dim ** -0.5``, no q/k norms,
    no gate); None for any other module.  The importer checks it against the module numerically."""
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    heads = getattr(m, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0):
        return None
    E = qkv.in_features
    if qkv.out_features != 3 * E or proj.in_features != E or E % heads:
        return None
    if abs(float(getattr(m, "scale", (E // heads) ** -0.5)) - (E // heads) ** -0.5) > 1e-12:
        return None
    for name in ("q_norm", "k_norm", "norm"):
        sub = getattr(m, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            return None
    if getattr(m, "gate", None) is not None:
        return None
    w = qkv.weight.detach().to(torch.float64)
    b = None if qkv.bias is None else qkv.bias.detach().to(torch.float64)
    part = (lambda t, k: None if t is None else t[k * E:(k + 1) * E].clone())
    return Attention(heads, part(w, 0), part(w, 1), part(w, 2), proj.weight.detach().to(torch.float64).clone(),
                     part(b, 0), part(b, 1), part(b, 2),
                     None if proj.bias is None else proj.bias.detach().to(torch.float64).clone())


def trace_module(module: nn.Module) -> fx.GraphModule:
    """Symbolically trace an ``nn.Module``; raises whatever fx raises for untraceable code."""
    if isinstance(module, fx.GraphModule):
        return module
    import inspect

    # optional arguments after the input (masks, flags) are traced at their defaults
    try:
        params = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    concrete = {p.name: p.default for p in params
                if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    graph = _LeafTracer().trace(module, concrete_args=concrete or None)
    return fx.GraphModule(module, graph)


class _Builder:
    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...], path: str | None,
                 keep_params: bool = False):
        self.gm = gm
        self.keep_params = bool(keep_params)
        self._absorbed: set[fx.Node] = set()  # nodes folded into a recognised pattern (MinMax)
        self.attention_of: dict[fx.Node, int] = {}  # nn.MultiheadAttention call -> its graph node
        self._pre_emitted: set[fx.Node] = set()
        self.input_shape = tuple(input_shape)
        self.path = path
        self.env: dict[fx.Node, Any] = {}
        self.dep: dict[fx.Node, bool] = {}
        self.index: dict[fx.Node, int] = {}  # fx node -> graph node index
        self.nodes: list[Node] = []
        self.unsupported: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.softmax_of: dict[fx.Node, fx.Node] = {}
        self.tuple_of: dict[fx.Node, fx.Node] = {}  # split-like nodes -> their input-dependent source

    # -- evaluation -------------------------------------------------------------------------------
    def _run(self, node: fx.Node, env: dict, override: dict | None = None):
        def lookup(a):
            if override is not None and a in override:
                return override[a]
            return env[a]

        args = fx.node.map_arg(node.args, lookup)
        kwargs = fx.node.map_arg(node.kwargs, lookup)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise ValueError(node.op)

    def _closure(self, node: fx.Node, src: fx.Node) -> Callable[[torch.Tensor], torch.Tensor]:
        """The node's op as a function of its one input-dependent argument (others fixed)."""
        env = self.env

        def fn(t):
            return self._run(node, env, {src: t})

        return fn

    def _is_shape_op(self, node: fx.Node) -> bool:
        if node.op == "call_module" and op_name(self.gm, node) == "OnnxShape":
            return True
        if node.op == "call_method" and node.target in ("size", "dim", "numel"):
            return True
        if node.op == "call_function" and getattr(node.target, "__name__", "") in (
                "sym_size.int", "sym_numel.default", "sym_stride.int", "sym_size"):
            return True  # torch.export's symbolic sizes: shape arithmetic, folded like x.size()
        if node.op == "call_function" and node.target in (getattr, len) and (
                node.target is len or (len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device"))):
            return True
        return False

    # -- emission ---------------------------------------------------------------------------------
    def _emit(self, fxn: fx.Node, kind: str, inputs: list[fx.Node], op: Any) -> None:
        shape = tuple(self.env[fxn].shape[1:])
        self.index[fxn] = len(self.nodes)
        self.nodes.append(Node(fxn.name, kind, [self.index[i] for i in inputs], shape, op, [fxn.name]))

    def _alias(self, fxn: fx.Node, src: fx.Node) -> None:
        self.index[fxn] = self.index[src]

    def _bad(self, fxn: fx.Node, why: str | None = None) -> None:
        name = op_name(self.gm, fxn)
        self.unsupported.append((name + (f" [{why}]" if why else ""), fxn.name))
        if isinstance(self.env.get(fxn), torch.Tensor) and fxn not in self.index:
            # placeholder so that nodes further down are still classified (all problems listed at once)
            ins = [a for a in fxn.all_input_nodes if self.index.get(a) is not None]
            self._emit(fxn, "unsupported", ins, None)

    # -- main -------------------------------------------------------------------------------------
    def build(self, example: torch.Tensor) -> LipschitzGraph:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        # optional arguments traced at their defaults (trace_module) carry the default as their argument
        fixed = [n for n in placeholders[1:] if n.args]
        if len(placeholders) - len(fixed) != 1:
            raise UserInputError(f"the model has {len(placeholders) - len(fixed)} inputs; lipverify needs exactly one",
                                 self.path)
        out_node = None
        for node in self.gm.graph.nodes:
            if node in fixed:
                self.env[node] = node.args[0]
                self.dep[node] = False
                continue
            if node.op == "placeholder":
                self.env[node] = example
                self.dep[node] = True
                self.index[node] = 0
                self.nodes.append(Node(node.name, "input", [], tuple(example.shape[1:]), None, [node.name]))
                continue
            if node.op == "get_attr":
                obj = self.gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                self.env[node] = obj
                self.dep[node] = False
                continue
            if node.op == "output":
                out_node = node
                continue
            deps = [a for a in node.all_input_nodes if self.dep.get(a, False)]
            try:
                self.env[node] = self._run(node, self.env)
            except Exception as exc:  # the model itself fails on this input
                if deps and any(a in self.unsupported_nodes() for a in deps):
                    self.env[node] = None
                    self.dep[node] = True
                    continue
                raise UserInputError(
                    f"running node {node.name} ({op_name(self.gm, node)}) on an input of shape "
                    f"{tuple(example.shape[1:])} failed: {str(exc).splitlines()[0]}", self.path) from exc
            if self._is_shape_op(node) or not deps:
                self.dep[node] = False
                continue
            self.dep[node] = True
            if node in self._absorbed or node in self._pre_emitted:
                continue  # part of a pattern already emitted as one graph node
            if any(self.env.get(d) is None or self.index.get(d) is None for d in deps):
                self.index[node] = None  # downstream of an unsupported node
                continue
            if self.env[node] is None and not node.users:
                self.dep[node] = False  # e.g. the shape guard of a torch.export program
                continue
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.tuple_of:
                self._tuple_item(node)
                continue
            if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), nn.MultiheadAttention):
                self._attention(node, deps)
                continue
            if node.op == "call_module" and qkv_attention(self.gm.get_submodule(node.target)) is not None:
                self._qkv_attention(node, deps)
                continue
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.attention_of:
                if node.args[1] == 0:
                    self.index[node] = self.attention_of[node.args[0]]
                else:
                    self._bad(node, "attention weights used as a value")
                continue
            if (isinstance(self.env[node], (tuple, list)) and len(deps) == 1 and self.env[node]
                    and all(isinstance(t, torch.Tensor) for t in self.env[node])
                    and all(u.op == "call_function" and u.target is operator.getitem for u in node.users)):
                # split / chunk / unbind: each piece is read by a getitem, bounded as one selection
                self.tuple_of[node] = deps[0]
                self.index[node] = self.index[deps[0]]
                continue
            if not isinstance(self.env[node], torch.Tensor):
                self._bad(node, "non-tensor output")
                self.index[node] = None
                continue
            self._classify(node, deps)
            if node not in self.index and node not in self._absorbed:
                self.index[node] = None
        return self._finish(out_node)

    def unsupported_nodes(self):
        return {n for n, i in self.index.items() if i is None}

    def _finish(self, out_node: fx.Node) -> LipschitzGraph:
        if self.unsupported:
            raise UnsupportedOpError(self.unsupported, self.path)
        arg = out_node.args[0]
        if isinstance(arg, (tuple, list)):
            if len(arg) != 1:
                raise UserInputError(f"the model has {len(arg)} outputs; lipverify needs exactly one", self.path)
            arg = arg[0]
        if isinstance(arg, dict) or not isinstance(arg, fx.Node):
            raise UserInputError("the model output is not a single tensor", self.path)
        while arg in self.softmax_of:
            self.notes.append(f"stripped the trailing {op_name(self.gm, arg)} ({arg.name}): "
                              "bounds and certificates are about the logits (same argmax)")
            arg = self.softmax_of[arg]
        if not self.dep.get(arg, False):
            raise UserInputError("the model output does not depend on its input", self.path)
        out_idx = self.index[arg]
        if out_idx is None:
            raise UnsupportedOpError([(op_name(self.gm, arg), arg.name)], self.path)
        for sm in self.softmax_of:
            if any(u.op != "output" for u in sm.users):
                raise UnsupportedOpError([(op_name(self.gm, sm) + " [not at the output]", sm.name)], self.path)
        g = LipschitzGraph(self.nodes, out_idx, self.notes)
        g.logits_fx_node = arg.name  # the fx node whose value are the logits (after stripping)
        return g

    # -- classification ---------------------------------------------------------------------------
    def _classify(self, node: fx.Node, deps: list[fx.Node]) -> None:
        gm = self.gm
        name = op_name(gm, node)
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None

        # softmax: only legal at the output; resolved in _finish
        if name in SOFTMAX_OPS or (node.op == "call_function" and node.target in (torch.softmax, F.softmax,
                                                                              F.log_softmax, torch.log_softmax)):
            self.softmax_of[node] = deps[0]
            self.index[node] = self.index[deps[0]]
            return

        # residual add / sub of two input-dependent tensors
        bk = binary_kind(gm, node)
        dep_args = [a for a in node.args if isinstance(a, fx.Node) and self.dep.get(a, False)]
        if bk is not None and len(dep_args) == 2:
            if bk in ("add", "sub"):
                alpha = float(node.kwargs.get("alpha", 1.0))
                self._emit(node, "add", dep_args, (1.0, alpha if bk == "add" else -alpha))
            elif bk == "mul" and self._silu_pattern(node, dep_args):
                return
            elif bk == "mul" and self._product(node, dep_args):
                return
            else:
                self._bad(node, "product of two input-dependent tensors" if bk == "mul" else
                          "division by an input-dependent tensor")
            return
        is_concat = name in ("OnnxConcat", "cat") or (node.op == "call_function" and node.target is torch.cat)
        if len(deps) != 1:
            if is_concat:
                self._concat(node, deps)
                return
            if self._minmax_pattern(node, deps):
                return
            lname = name.lower()
            if "matmul" in lname or "mat_mul" in lname or "bmm" in lname or "scaled_dot_product" in lname:
                self._bad(node, "product of input-dependent matrices: attention is bounded as nn.MultiheadAttention "
                                "in a module or a state dict with --arch, not in its exported form")
            else:
                self._bad(node)
            return
        src = deps[0]
        x = self.env[src]
        in_shape = tuple(x.shape[1:])

        if bk is not None or is_neg(gm, node):
            self._elementwise_affine(node, src, bk)
            return

        if is_concat:  # a concatenation of a single tensor is the identity
            self._select(node, src, in_shape, "identity")
            return
        if self._reduction(node, src, in_shape, name, mod):
            return

        if (name == "OnnxErf" or (node.op == "call_function" and node.target is torch.erf)) and \
                self._gelu_erf_pattern(node, src):
            return
        if self._normalization(node, src, in_shape, mod):
            return
        if _LinfDist is not None and isinstance(mod, _LinfDist) and len(in_shape) == 1:
            import copy

            layer = copy.deepcopy(mod).double().requires_grad_(False)
            self._emit(node, "linf_dist", [src], layer)
            return
        if _MeanShift is not None and isinstance(mod, _MeanShift) and len(in_shape) == 1:
            op = Scale(torch.ones(in_shape, dtype=torch.float64), in_shape,
                       bias=-mod.running_mean.detach().to(torch.float64).clone())
            self._emit_checked(node, src, op, label="mean shift (evaluation)")
            return
        if name == "tanh" or (mod is not None and type(mod) is nn.Tanh) or \
                (node.op == "call_function" and node.target in (torch.tanh, F.tanh)):
            if self._gelu_tanh_pattern(node, src):
                return

        # activations
        if mod is not None and type(mod) in ACT_MODULES:
            act, kw = ACT_MODULES[type(mod)](mod)
            self._emit(node, "activation", [src], make_activation(act, **kw))
            return
        if mod is not None and name in ONNX_ACT_MODULES:
            act, kw = ONNX_ACT_MODULES[name](mod)
            self._emit(node, "activation", [src], make_activation(act, **kw))
            return
        if node.op == "call_function" and node.target in (F.prelu, torch.prelu) and node.args[0] is src:
            try:
                w = self._const_arg(node, 1, "weight")
            except _NotConst:
                w = None
            if isinstance(w, torch.Tensor) and w.numel() in (1, in_shape[0] if in_shape else 1):
                self._emit(node, "activation", [src], make_activation("prelu", weight=w.detach().reshape(-1)))
            else:
                self._bad(node, "PReLU slopes not constant per channel")
            return
        if mod is not None and name == "OnnxPReLU" and node.args[0] is src:
            slope = self._const_arg(node, 1, "slope")
            c = in_shape[0] if in_shape else 1
            if isinstance(slope, torch.Tensor) and (slope.numel() == 1 or slope.numel() == c):
                w = slope.detach().reshape(-1)
                self._emit(node, "activation", [src], make_activation("prelu", weight=w))
                return
            self._bad(node, "PReLU slopes not per channel")
            return
        if mod is not None and type(mod).__name__ == "OnnxFunction" and mod.function in (torch.tanh, torch.abs):
            self._emit(node, "activation", [src], make_activation("tanh" if mod.function is torch.tanh else "abs"))
            return
        if node.op == "call_function" and node.target is torch.abs or (node.op == "call_method" and node.target == "abs"):
            self._emit(node, "activation", [src], make_activation("abs"))
            return
        if mod is not None and name == "OnnxClip":
            self._emit(node, "activation", [src], make_activation("clip", min=mod.min_val, max=mod.max_val))
            return
        if (node.op == "call_function" and node.target in ACT_FUNCS) or (
                node.op == "call_method" and node.target in ACT_METHODS):
            act = ACT_FUNCS.get(node.target) if node.op == "call_function" else ACT_METHODS[node.target]
            kw = self._act_kwargs(node, act)
            if kw is None:
                self._bad(node, "non-constant parameters")
                return
            self._emit(node, "activation", [src], make_activation(act, **kw))
            return
        if self._minmax_const(node, src):
            return
        if _MinMax is not None and isinstance(mod, _MinMax):
            if in_shape[0] % 2:
                self._bad(node, "odd channel count")
                return
            self._emit(node, "minmax", [src], None)
            return

        # dense / conv / batch norm / pooling
        if isinstance(mod, nn.Linear):
            self._emit(node, "linear", [src], Dense(mod.weight, in_shape,
                                                    None if mod.bias is None else mod.bias.detach(),
                                                    keep_params=self.keep_params))
            return
        if node.op == "call_function" and node.target is F.linear:
            w = self._const_arg(node, 1, "weight")
            b = self._const_arg(node, 2, "bias")
            if isinstance(w, torch.Tensor) and node.args[0] is src:
                self._emit(node, "linear", [src], Dense(w, in_shape, None if b is None else b.detach(),
                                                        keep_params=self.keep_params))
                return
        if (name == "OnnxMatMul" or (node.op == "call_function" and node.target in (torch.matmul, operator.matmul))):
            if node.args[0] is src and isinstance(self.env[node.args[1]], torch.Tensor) \
                    and self.env[node.args[1]].dim() == 2:
                self._emit(node, "linear", [src], Dense(self.env[node.args[1]].detach().T, in_shape))
                return
            self._bad(node, "matmul with an input-dependent right operand")
            return
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and not isinstance(mod, nn.ConvTranspose2d):
            self._conv_module(node, mod, src, in_shape)
            return
        if isinstance(mod, nn.ConvTranspose2d) or (node.op == "call_function" and node.target in (
                F.conv_transpose2d, torch.conv_transpose2d)):
            self._conv_transpose(node, mod, src, in_shape)
            return
        if node.op == "call_function" and node.target in (F.conv2d, F.conv1d, torch.conv2d, torch.conv1d):
            self._conv_function(node, src, in_shape)
            return
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) or name == "OnnxBatchNorm" or (
                node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm)):
            if mod is not None and mod.training:
                self._bad(node, "BatchNorm in training mode")
                return
            self._channel_affine(node, src, in_shape, mod)
            return
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) or name in (
                "OnnxGlobalAveragePool", "OnnxGlobalAveragePoolWithKnownInputShape") or (
                node.op == "call_function" and node.target in (F.avg_pool2d, F.adaptive_avg_pool2d)):
            self._avgpool(node, src, in_shape)
            return
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)) or (
                node.op == "call_function" and node.target in (F.max_pool2d, F.max_pool1d)):
            self._maxpool(node, mod, src, in_shape)
            return

        # coordinate selections
        if name in SELECT_MODULES or (node.op == "call_function" and (
                node.target in SELECT_FUNCS or str(getattr(node.target, "__name__", "")).split(".")[0] in SELECT_FUNC_NAMES)) or (
                node.op == "call_method" and node.target in SELECT_METHODS):
            self._select(node, src, in_shape, name)
            return
        self._bad(node)

    # -- helpers per op ---------------------------------------------------------------------------
    def _gelu_erf_pattern(self, erf: fx.Node, d: fx.Node) -> bool:
        """``x * (1 + erf(x / sqrt 2))`` — GELU as ONNX exporters write it (times 2; the 0.5 that usually
        follows is an ordinary scale).  Structure: ``d = x / c`` (or ``x * c``), ``erf(d)``, ``+ 1``, then
        the product with ``x``; checked numerically on the example and on a random input."""
        gm = self.gm
        if len(erf.users) != 1:
            return False
        add = next(iter(erf.users))
        if binary_kind(gm, add) != "add" or len(add.users) != 1:
            return False
        mul = next(iter(add.users))
        if binary_kind(gm, mul) != "mul":
            return False
        dep_d = [a for a in d.all_input_nodes if self.dep.get(a, False)]
        if binary_kind(gm, d) not in ("div", "mul") or len(dep_d) != 1:
            return False
        x = dep_d[0]
        if set(a for a in mul.args if isinstance(a, fx.Node)) != {x, add}:
            return False
        return self._emit_gelu(x, [d, erf, add, mul], erf, add, "none", seed=11)

    def _gelu_tanh_pattern(self, tanh: fx.Node, inner: fx.Node) -> bool:
        """``x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` — the tanh form of GELU as exporters write it
        (2 GELU; the 0.5 that follows is an ordinary scale).  Structure: ``tanh``, ``+ 1``, the product
        with ``x``, where the tanh's argument depends on ``x`` alone; checked numerically on the
        example and on a random input.  The nodes of the polynomial become dead and are pruned."""
        gm = self.gm
        if len(tanh.users) != 1:
            return False
        add = next(iter(tanh.users))
        if binary_kind(gm, add) != "add" or len(add.users) != 1:
            return False
        mul = next(iter(add.users))
        if binary_kind(gm, mul) != "mul":
            return False
        others = [a for a in mul.args if isinstance(a, fx.Node) and a is not add and self.dep.get(a, False)]
        if len(others) != 1:
            return False
        x = others[0]
        # the tanh's argument: a function of x only
        chain, todo, seen = [], [inner], set()
        while todo:
            n = todo.pop()
            if n is x or n in seen:
                continue
            seen.add(n)
            deps = [a for a in n.all_input_nodes if self.dep.get(a, False)]
            if not deps or n.op == "placeholder" or len(seen) > 16:
                return False
            chain.append(n)
            todo.extend(deps)
        order = {n: k for k, n in enumerate(gm.graph.nodes)}
        chain = sorted(chain, key=order.get) + [tanh, add, mul]
        return self._emit_gelu(x, chain, tanh, add, "tanh", seed=12)

    def _emit_gelu(self, x: fx.Node, chain: list, trigger: fx.Node, add: fx.Node, approximate: str,
                   seed: int) -> bool:
        """Emit ``chain`` (ending in the product with ``x``) as one ``2 GELU`` activation of ``x`` when it
        computes ``2 * gelu(x, approximate)`` on the example and on a random input."""
        gm = self.gm
        mul = chain[-1]

        def run(xv):
            local = dict(self.env)
            local[x] = xv
            for n in chain:
                for a in n.all_input_nodes:  # constants later in the fx order than the chain's start
                    if a not in local and a.op == "get_attr":
                        obj = gm
                        for part in a.target.split("."):
                            obj = getattr(obj, part)
                        local[a] = obj
                local[n] = self._run(n, local)
            return local[mul]

        with torch.no_grad():
            try:
                xv = self.env[x]
                t = torch.randn(xv.shape, generator=torch.Generator().manual_seed(seed), dtype=xv.dtype).to(xv.device) * 3
                ok = all(torch.allclose(run(v), 2 * F.gelu(v, approximate=approximate), rtol=1e-5,
                                        atol=1e-5 * (1 + float(v.abs().max()))) for v in (xv, t))
            except Exception:
                return False
        if not ok:
            return False
        self.index[mul] = len(self.nodes)
        self.nodes.append(Node(mul.name, "activation", [self.index[x]], tuple(self.env[x].shape[1:]),
                               make_activation("gelu", scale=2.0, approximate=approximate), [n.name for n in chain]))
        self._absorbed.update({trigger, add})
        self._pre_emitted.add(mul)
        self.index[trigger] = self.index[mul]
        return True

    def _attention(self, node: fx.Node, deps) -> None:
        """``nn.MultiheadAttention(x, x, x)`` (self-attention, ``batch_first``, no masks): one ``attention``
        node, bounded on the input domain; its output is read by ``getitem 0``."""
        mod = self.gm.get_submodule(node.target)
        args = list(node.args) + [node.kwargs.get(k) for k in ("query", "key", "value") if k in node.kwargs]
        qkv = [a for a in args[:3]]
        # forward(query, key, value, key_padding_mask, need_weights, attn_mask, ...)
        masks = [node.kwargs.get(k) for k in ("key_padding_mask", "attn_mask")] + list(node.args[3:4]) + \
            list(node.args[5:6])
        why = None
        if len(deps) != 1 or len(qkv) != 3 or not all(a is deps[0] for a in qkv):
            why = "attention with different query, key and value (only self-attention is bounded)"
        elif not mod.batch_first:
            why = "attention without batch_first (the batch axis is not first)"
        elif any(m is not None for m in masks) or not mod._qkv_same_embed_dim or mod.bias_k is not None \
                or mod.add_zero_attn:
            why = "attention with masks, bias_k/v or separate key/value dimensions"
        if why is None:
            E = mod.embed_dim
            w = mod.in_proj_weight.detach().to(torch.float64)
            b = None if mod.in_proj_bias is None else mod.in_proj_bias.detach().to(torch.float64)
            att = Attention(mod.num_heads, w[:E].clone(), w[E:2 * E].clone(), w[2 * E:].clone(),
                            mod.out_proj.weight.detach().to(torch.float64).clone(),
                            None if b is None else b[:E].clone(), None if b is None else b[E:2 * E].clone(),
                            None if b is None else b[2 * E:].clone(),
                            None if mod.out_proj.bias is None else mod.out_proj.bias.detach().to(torch.float64).clone())
            x = self.env[deps[0]]
            with torch.no_grad():
                got = att(x.to(torch.float64))
            want = self.env[node][0]
            if x.dim() != 3 or got.shape != want.shape or not torch.allclose(
                    got.to(want.dtype), want, rtol=1e-4, atol=1e-4 * (1 + float(want.abs().max()))):
                why = "could not reproduce the attention"
        if why is not None:
            self._bad(node, why)
            self.index[node] = None
            return
        self.index[node] = len(self.nodes)
        self.nodes.append(Node(node.name, "attention", [self.index[deps[0]]], tuple(self.env[node][0].shape[1:]),
                               att, [node.name]))
        self.attention_of[node] = self.index[node]

    def _qkv_attention(self, node: fx.Node, deps) -> None:
        att = qkv_attention(self.gm.get_submodule(node.target))
        extra = [v for k, v in node.kwargs.items() if not (k in ("attn_mask", "mask") and v is None)
                 and not (k == "is_causal" and v is False)]
        ok = len(deps) == 1 and len(node.args) == 1 and not extra and self.env[deps[0]].dim() == 3
        if ok:
            with torch.no_grad():
                got = att(self.env[deps[0]].to(torch.float64))
            want = self.env[node]
            ok = isinstance(want, torch.Tensor) and got.shape == want.shape and torch.allclose(
                got.to(want.dtype), want, rtol=1e-4, atol=1e-4 * (1 + float(want.abs().max())))
        if not ok:
            self._bad(node, "could not reproduce the attention")
            self.index[node] = None
            return
        self._emit(node, "attention", [deps[0]], att)

    def _tuple_item(self, node: fx.Node) -> None:
        """``split(x)[i]`` (and chunk, unbind, ONNX Split): a coordinate selection of ``x``."""
        parent = node.args[0]
        src = self.tuple_of[parent]
        env = self.env

        def fn(t):
            return self._run(node, env, {parent: self._run(parent, env, {src: t})})

        in_shape = tuple(self.env[src].shape[1:])
        try:
            sel = probe_select(fn, in_shape, TRACE_BATCH, label="split")
        except Exception:
            sel = None
        if sel is None:
            self._bad(node, "not a coordinate selection")
            self.index.setdefault(node, None)
            return
        self._emit_checked(node, src, sel)

    def _is_sigmoid_of(self, s: fx.Node, a: fx.Node) -> bool:
        if not s.args or s.args[0] is not a:
            return False
        if s.op == "call_module":
            m = self.gm.get_submodule(s.target)
            return isinstance(m, nn.Sigmoid) or (type(m).__name__ == "OnnxFunction" and m.function is torch.sigmoid)
        if s.op == "call_function":
            return s.target in (torch.sigmoid, F.sigmoid)
        return s.op == "call_method" and s.target == "sigmoid"

    def _silu_pattern(self, node, dep_args) -> bool:
        """``x * sigmoid(x)`` (how exporters write SiLU / swish) is the SiLU activation of ``x``."""
        a, b = dep_args
        for x, s in ((a, b), (b, a)):
            if self._is_sigmoid_of(s, x):
                self._emit(node, "activation", [x], make_activation("silu"))
                return True
        return False

    def _reduction(self, node, src, in_shape, name, mod) -> bool:
        """Mean or sum over per-example axes: a linear map, built as reshape -> dense on the last axis
        (the all-``1/k`` or all-ones row, block diagonal: l2 norm ``1/sqrt(k)`` resp. ``sqrt(k)``) ->
        reshape.  Returns False when the node is not such a reduction."""
        kind = None
        if mod is not None and name == "OnnxReduceStaticAxes":
            kind = {"ReduceMean": "mean", "ReduceSum": "sum"}.get(mod.operation_type)
            if kind is None:
                return False
        elif mod is not None and name in ("OnnxReduceSumStaticAxes", "OnnxReduceSumDynamicAxes"):
            kind = "sum"
        elif node.op == "call_function" and node.target in MEAN_FUNCS | SUM_FUNCS:
            kind = "mean" if node.target in MEAN_FUNCS else "sum"
        elif node.op == "call_method" and node.target in ("mean", "sum"):
            kind = node.target
        if kind is None:
            return False
        x, y = self.env[src], self.env[node]
        n_in = x[0].numel()
        n_out = y[0].numel() if y.dim() else 0
        if y.dim() == 0 or y.shape[0] != x.shape[0] or n_out == 0 or n_in % n_out:
            self._bad(node, "reduction over the batch axis")
            return True
        # which per-example axes are reduced: those whose size differs or that disappear
        fn = self._closure(node, src)
        nd = len(in_shape)
        for axes in _axis_subsets(nd):
            k = 1
            for a in axes:
                k *= in_shape[a]
            if k != n_in // n_out:
                continue
            keep = [a for a in range(nd) if a not in axes]
            perm = [0] + [a + 1 for a in keep] + [a + 1 for a in axes]
            rest = tuple(in_shape[a] for a in keep)
            to_last = probe_select(lambda t, perm=perm, rest=rest, k=k: t.permute(perm).reshape((t.shape[0],) + rest + (k,)),
                                   in_shape, TRACE_BATCH, label="permute")
            if to_last is None:
                continue
            w = torch.full((1, k), 1.0 / k if kind == "mean" else 1.0, dtype=torch.float64)
            dense = Dense(w, rest + (k,))
            back = probe_select(lambda t, shape=tuple(y.shape[1:]): t.reshape((t.shape[0],) + shape),
                                rest + (1,), TRACE_BATCH, label="reshape")
            if back is None:
                continue
            op = Chain([to_last, dense, back])
            with torch.no_grad():
                got = op.forward(x.double())
            if got.shape == y.shape and torch.allclose(got, fn(x.double()).double(), rtol=1e-6, atol=1e-9):
                self._emit_checked(node, src, op, label=kind)
                return True
        self._bad(node, f"reduce-{kind} over axes lipverify could not identify")
        return True

    def _product(self, node, deps) -> bool:
        """``a * b`` of two input-dependent tensors (squeeze-excitation gates, gated units): a ``mul``
        node, bounded on the input domain.  Both factors must broadcast to the output without a change
        of rank."""
        out = tuple(self.env[node].shape[1:])
        shapes = [tuple(self.env[d].shape[1:]) for d in deps]
        if any(len(sh) != len(out) or any(a not in (1, b) for a, b in zip(sh, out)) for sh in shapes):
            return False
        if any(self.index.get(d) is None for d in deps):
            return False
        self._emit(node, "mul", deps, None)
        return True

    def _normalization(self, node, src, in_shape, mod) -> bool:
        """LayerNorm / GroupNorm / InstanceNorm (modules, functional calls, onnx2torch's instance norm)
        as a ``normalize`` node; False when the node is none of them."""
        def param(t, shape):
            return None if t is None else t.detach().to(torch.float64).reshape(shape).clone()

        if not in_shape:
            return False
        C, spatial = in_shape[0], in_shape[1:]
        per_channel = (C,) + (1,) * len(spatial)
        norm = None
        try:
            if isinstance(mod, nn.LayerNorm):
                k = len(mod.normalized_shape)
                size = int(torch.Size(in_shape[-k:]).numel())
                norm = Normalization("layer_norm", int(torch.Size(in_shape).numel()) // size, size, float(mod.eps),
                                     param(mod.weight, tuple(mod.normalized_shape)),
                                     param(mod.bias, tuple(mod.normalized_shape)))
            elif isinstance(mod, nn.GroupNorm):
                G = int(mod.num_groups)
                norm = Normalization(f"group_norm({G})", G, int(torch.Size(in_shape).numel()) // G, float(mod.eps),
                                     param(mod.weight, per_channel), param(mod.bias, per_channel))
            elif isinstance(mod, nn.modules.instancenorm._InstanceNorm) and not mod.track_running_stats:
                norm = Normalization("instance_norm", C, int(torch.Size(spatial).numel()), float(mod.eps),
                                     param(mod.weight, per_channel), param(mod.bias, per_channel))
            elif mod is not None and type(mod).__name__ == "OnnxInstanceNorm":
                w, b = self._const_arg(node, 1, "weight"), self._const_arg(node, 2, "bias")
                norm = Normalization("instance_norm", C, int(torch.Size(spatial).numel()), float(mod.epsilon),
                                     param(w, per_channel), param(b, per_channel))
            elif node.op == "call_function" and _aten_name(node) == "instance_norm" and \
                    bool(self._const_arg(node, 5, "use_input_stats", True)):
                norm = Normalization("instance_norm", C, int(torch.Size(spatial).numel()),
                                     float(self._const_arg(node, 7, "eps", 1e-5)),
                                     param(self._const_arg(node, 1, "weight"), per_channel),
                                     param(self._const_arg(node, 2, "bias"), per_channel))
            elif node.op == "call_function" and (node.target in (F.layer_norm, torch.layer_norm)
                                                 or _aten_name(node) == "layer_norm"):
                shape = tuple(self._const_arg(node, 1, "normalized_shape"))
                size = int(torch.Size(shape).numel())
                norm = Normalization("layer_norm", int(torch.Size(in_shape).numel()) // size, size,
                                     float(self._const_arg(node, 4, "eps", 1e-5)),
                                     param(self._const_arg(node, 2, "weight"), shape),
                                     param(self._const_arg(node, 3, "bias"), shape))
            elif node.op == "call_function" and (node.target in (F.group_norm, torch.group_norm)
                                                 or _aten_name(node) == "group_norm"):
                G = int(self._const_arg(node, 1, "num_groups"))
                norm = Normalization(f"group_norm({G})", G, int(torch.Size(in_shape).numel()) // G,
                                     float(self._const_arg(node, 4, "eps", 1e-5)),
                                     param(self._const_arg(node, 2, "weight"), per_channel),
                                     param(self._const_arg(node, 3, "bias"), per_channel))
        except _NotConst:
            self._bad(node, "normalisation with input-dependent scale or shift")
            return True
        if norm is None or node.args[0] is not src:
            return False
        with torch.no_grad():
            got = norm(self.env[src].to(torch.float64))
        want = self.env[node]
        if got.shape != want.shape or not torch.allclose(got.to(want.dtype), want, rtol=1e-4,
                                                         atol=1e-4 * (1 + float(want.abs().max()))):
            self._bad(node, "could not reproduce the normalisation")
            return True
        self._emit(node, "normalization", [src], norm)
        return True

    def _const_arg(self, node, pos, key, default=None):
        if len(node.args) > pos:
            a = node.args[pos]
        else:
            a = node.kwargs.get(key, default)
        if isinstance(a, fx.Node):
            if self.dep.get(a, False):
                raise _NotConst()
            return self.env[a]
        return a

    def _act_kwargs(self, node, act) -> dict | None:
        try:
            if act == "clip":
                return {"min": _num(self._const_arg(node, 1, "min")), "max": _num(self._const_arg(node, 2, "max"))}
            if act == "leaky_relu":
                return {"negative_slope": _num(self._const_arg(node, 1, "negative_slope", 0.01))}
            if act == "elu":
                return {"alpha": _num(self._const_arg(node, 1, "alpha", 1.0))}
            if act == "hardtanh":
                return {"min_val": _num(self._const_arg(node, 1, "min_val", -1.0)),
                        "max_val": _num(self._const_arg(node, 2, "max_val", 1.0))}
            if act == "softplus":
                return {"beta": _num(self._const_arg(node, 1, "beta", 1.0))}
            if act == "gelu":
                ap = node.kwargs.get("approximate", "none")
                return {"approximate": ap} if ap in ("none", "tanh") else None
            return {}
        except _NotConst:
            return None

    def _elementwise_affine(self, node, src, bk):
        """``x + c``, ``x - c``, ``c - x``, ``x * c``, ``x / c``, ``-x`` with constant ``c``."""
        fn = self._closure(node, src)
        x = self.env[src]
        in_shape = tuple(x.shape[1:])
        if bk == "div" and node.args[0] is not src:
            self._bad(node, "division by an input-dependent tensor")
            return
        with torch.no_grad():
            z = torch.zeros_like(x)
            b = fn(z)
            a = fn(torch.ones_like(x)) - b
        if tuple(b.shape) != tuple(x.shape):
            self._bad(node, "broadcast changes the shape")
            return
        if not (torch.allclose(a, a[:1].expand_as(a)) and torch.allclose(b, b[:1].expand_as(b))):
            self._bad(node, "constant differs across the batch")
            return
        a0, b0 = a[0], b[0]
        # check the map really is x -> a*x + b on a random input
        with torch.no_grad():
            r = torch.randn_like(x)
            if not torch.allclose(fn(r), a * r + b, rtol=1e-5, atol=1e-5 * (1 + float(b.abs().max()))):
                self._bad(node, "not an element-wise affine map")
                return
        self._emit(node, "linear", [src], Scale(a0.detach(), in_shape,
                                                b0.detach() if bool(torch.any(b0 != 0)) else None))

    def _channel_affine(self, node, src, in_shape, mod=None):
        """BatchNorm in eval: an element-wise affine map.  For a BatchNorm module with running
        statistics the scale ``gamma / sqrt(var + eps)`` and offset ``beta - mean * scale`` are computed
        in float64 from its parameters (measuring them through the float32 op would round them), and
        checked against the op on a random input; otherwise measured from the op itself."""
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and mod.running_var is not None \
                and mod.running_mean is not None and len(in_shape) >= 1 and in_shape[0] == mod.num_features:
            with torch.no_grad():
                var, mean = mod.running_var.detach().double(), mod.running_mean.detach().double()
                w = mod.weight.detach().double() if mod.weight is not None else torch.ones_like(var)
                b = mod.bias.detach().double() if mod.bias is not None else torch.zeros_like(var)
                a = w / torch.sqrt(var + float(mod.eps))
                off = b - mean * a
                view = (-1,) + (1,) * (len(in_shape) - 1)
                a_full, b_full = a.view(view).expand(in_shape), off.view(view).expand(in_shape)
                x = torch.randn((2,) + tuple(in_shape), generator=torch.Generator().manual_seed(0))
                want = mod(x.to(mod.running_var.dtype)).double()
                got = x.double() * a_full + b_full
                if torch.allclose(got, want, rtol=1e-5, atol=1e-5 * (1 + float(b_full.abs().max()))):
                    self._emit(node, "linear", [src], Scale(a_full.clone(), in_shape,
                                                            b_full.clone() if bool(torch.any(b_full != 0)) else None))
                    return
        self._elementwise_affine(node, src, "mul")

    def _conv_transpose(self, node, mod, src, in_shape):
        if len(in_shape) != 3:
            self._bad(node, "transposed convolution on a non-image input")
            return
        try:
            if mod is not None:
                if mod.padding_mode != "zeros":
                    self._bad(node, f"padding_mode {mod.padding_mode}")
                    return
                w, b = mod.weight, mod.bias
                st, pad, opad, dil, groups = mod.stride, mod.padding, mod.output_padding, mod.dilation, mod.groups
            else:
                w, b = self._const_arg(node, 1, "weight"), self._const_arg(node, 2, "bias")
                st = _pair(self._const_arg(node, 3, "stride", 1))
                pad = _pair(self._const_arg(node, 4, "padding", 0))
                opad = _pair(self._const_arg(node, 5, "output_padding", 0))
                groups = int(self._const_arg(node, 6, "groups", 1))
                dil = _pair(self._const_arg(node, 7, "dilation", 1))
        except _NotConst:
            self._bad(node, "input-dependent weights")
            return
        if not isinstance(w, torch.Tensor) or isinstance(pad, str):
            self._bad(node, "transposed convolution parameters")
            return
        op = ConvTranspose(w, in_shape, _pair(st), _pair(pad), _pair(opad), _pair(dil), groups,
                           bias=None if b is None else b.detach())
        self._emit_checked(node, src, op)

    def _conv_module(self, node, mod, src, in_shape):
        if mod.padding_mode != "zeros":
            self._bad(node, f"padding_mode {mod.padding_mode}")
            return
        one_d = isinstance(mod, nn.Conv1d)
        rp = mod._reversed_padding_repeated_twice  # (left, right[, top, bottom])
        padding = (rp[0], rp[1]) if one_d else (rp[2], rp[3], rp[0], rp[1])
        if isinstance(mod.padding, tuple) and not one_d:
            padding = (mod.padding[0], mod.padding[0], mod.padding[1], mod.padding[1])
        op = Conv(mod.weight, in_shape, tuple(mod.stride), padding, tuple(mod.dilation), mod.groups,
                  bias=None if mod.bias is None else mod.bias.detach(), one_d=one_d, keep_params=self.keep_params)
        self._emit_checked(node, src, op)

    def _conv_function(self, node, src, in_shape):
        try:
            w = self._const_arg(node, 1, "weight")
            b = self._const_arg(node, 2, "bias")
            stride = _pair(self._const_arg(node, 3, "stride", 1))
            pad = self._const_arg(node, 4, "padding", 0)
            dil = _pair(self._const_arg(node, 5, "dilation", 1))
            groups = int(self._const_arg(node, 6, "groups", 1))
        except _NotConst:
            self._bad(node, "input-dependent weights")
            return
        if isinstance(pad, str):
            self._bad(node, "string padding")
            return
        one_d = node.target in (F.conv1d, torch.conv1d)
        p = _pair(pad)
        padding = (p[0], p[0]) if one_d else (p[0], p[0], p[1], p[1])
        if one_d:
            stride, dil = (stride[0],), (dil[0],)
        op = Conv(w, in_shape, stride, padding, dil, groups, bias=None if b is None else b.detach(),
                  one_d=one_d, keep_params=self.keep_params)
        self._emit_checked(node, src, op)

    def _avgpool(self, node, src, in_shape):
        x = self.env[src]
        y = self.env[node]
        mod = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        one_d = x.dim() == 3
        c = in_shape[0]
        spatial_in = in_shape[1:]
        spatial_out = tuple(y.shape[2:])
        if mod is not None and isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d)):
            k, s, p = _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.padding)
            if mod.ceil_mode or getattr(mod, "divisor_override", None) or (any(p) and not mod.count_include_pad):
                self._avgpool_varying(node, src, in_shape, k, s, p)
                return
        elif node.op == "call_function" and node.target is F.avg_pool2d:
            k = _pair(self._const_arg(node, 1, "kernel_size"))
            s = _pair(self._const_arg(node, 2, "stride", None) or k)
            p = _pair(self._const_arg(node, 3, "padding", 0))
        else:  # adaptive / global average: a depthwise conv when the windows tile exactly
            if any(i % o for i, o in zip(spatial_in, spatial_out)):
                self._adaptive_avgpool_separable(node, src, in_shape, spatial_in, spatial_out)
                return
            k = tuple(i // o for i, o in zip(spatial_in, spatial_out))
            s, p = k, (0,) * len(k)
        if one_d:
            k, s, p = (k[0],), (s[0],), (p[0],)
            w = torch.full((c, 1, k[0]), 1.0 / k[0], dtype=x.dtype)
            op = Conv(w, in_shape, s, (p[0], p[0]), (1,), c, one_d=True)
        else:
            w = torch.full((c, 1, k[0], k[1]), 1.0 / (k[0] * k[1]), dtype=x.dtype)
            op = Conv(w, in_shape, s, (p[0], p[0], p[1], p[1]), (1, 1), c)
        self._emit_checked(node, src, op, label="avgpool")

    def _adaptive_avgpool_separable(self, node, src, in_shape, spatial_in, spatial_out):
        """Adaptive average pooling with windows of varying size (e.g. VGG's 2x2 -> 7x7): separable,
        ``A_h (x) A_w`` per channel, built as a dense map on the last axis, a transpose, a dense map on
        the other axis and a transpose back; ``A_w``/``A_h`` are the 1-d adaptive poolings' matrices."""
        if len(spatial_in) != 2:
            self._bad(node, "adaptive pooling with non-dividing sizes (1-d)")
            return
        c = in_shape[0]
        (hi, wi), (ho, wo) = spatial_in, spatial_out

        def mat(n_in, n_out):
            eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)
            return F.adaptive_avg_pool1d(eye, n_out)[:, 0, :].T.contiguous()  # (n_out, n_in)

        a_w, a_h = mat(wi, wo), mat(hi, ho)
        d_w = Dense(a_w, (c, hi, wi))
        swap1 = probe_select(lambda t: t.transpose(2, 3), (c, hi, wo), TRACE_BATCH, label="transpose")
        d_h = Dense(a_h, (c, wo, hi))
        swap2 = probe_select(lambda t: t.transpose(2, 3), (c, wo, ho), TRACE_BATCH, label="transpose")
        self._emit_checked(node, src, Chain([d_w, swap1, d_h, swap2]), label="adaptive avgpool")

    def _avgpool_varying(self, node, src, in_shape, k, s, p):
        """Average pooling whose divisor varies by position (``ceil_mode``, ``count_include_pad=False``,
        ``divisor_override``): a sum over each window (a convolution with a kernel of ones, padded so
        that the partial windows of ``ceil_mode`` exist) followed by a per-position scale
        ``1 / divisor``, read off the op itself as ``op(1) / sum(1)``."""
        x, y = self.env[src], self.env[node]
        if x.dim() != 4:
            self._bad(node, "avg-pool options on a 1-d input")
            return
        c, H, W = in_shape
        Ho, Wo = y.shape[2], y.shape[3]
        extra_h = max(0, (Ho - 1) * s[0] + k[0] - (H + 2 * p[0]))
        extra_w = max(0, (Wo - 1) * s[1] + k[1] - (W + 2 * p[1]))
        w = torch.ones((c, 1, k[0], k[1]), dtype=torch.float64)
        conv = Conv(w, in_shape, s, (p[0], p[0] + extra_h, p[1], p[1] + extra_w), (1, 1), c)
        if tuple(conv.out_shape) != tuple(y.shape[1:]):
            self._bad(node, "avg-pool geometry")
            return
        fn = self._closure(node, src)
        with torch.no_grad():
            ones = torch.ones((1,) + tuple(in_shape), dtype=torch.float64)
            summed = conv.apply(ones)[0]
            avg = fn(ones.to(x.dtype)).double()[0]
        if bool((summed <= 0).any()):
            self._bad(node, "avg-pool window outside the input")
            return
        scale = Scale((avg / summed), tuple(conv.out_shape))
        self._emit_checked(node, src, Chain([conv, scale]), label="avgpool")

    def _maxpool(self, node, mod, src, in_shape):
        one_d = len(in_shape) == 2
        if mod is not None:
            if mod.return_indices:
                self._bad(node, "return_indices")
                return
            k, s, p, d, ceil = mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode
        else:
            try:
                k = self._const_arg(node, 1, "kernel_size")
                s = self._const_arg(node, 2, "stride", None) or k
                p = self._const_arg(node, 3, "padding", 0)
                d = self._const_arg(node, 4, "dilation", 1)
                ceil = bool(self._const_arg(node, 5, "ceil_mode", False))
            except _NotConst:
                self._bad(node)
                return
        if one_d:
            mp = MaxPool((1, _pair(k)[0]), (1, _pair(s)[0]), (0, _pair(p)[0]), (1, _pair(d)[0]), ceil, True)
        else:
            mp = MaxPool(_pair(k), _pair(s), _pair(p), _pair(d), ceil)
        with torch.no_grad():
            if not torch.allclose(mp(self.env[src]), self.env[node]):
                self._bad(node, "could not reproduce the pooling")
                return
        self._emit(node, "maxpool", [src], mp)

    def _select(self, node, src, in_shape, name):
        fn = self._closure(node, src)
        try:
            sel = probe_select(fn, in_shape, TRACE_BATCH, label=_select_label(name))
        except Exception:
            sel = None
        if sel is None:
            why = "not a coordinate selection"
            if "resize" in name.lower() or "upsampl" in name.lower() or "interpolate" in name.lower():
                if self._separable_resize(node, src, in_shape, fn):
                    return
                why = "a resize that is neither a selection nor separable linear interpolation"
            self._bad(node, why)
            return
        self._emit_checked(node, src, sel)

    @staticmethod
    def _batched(fn, t: torch.Tensor, B: int) -> torch.Tensor:
        """``fn`` over the rows of ``t`` in chunks of ``B`` (the example's batch size, zero padded), float64."""
        outs = []
        for s in range(0, len(t), B):
            chunk = t[s:s + B]
            if len(chunk) < B:
                chunk = torch.cat([chunk, chunk.new_zeros((B - len(chunk),) + tuple(chunk.shape[1:]))])
            outs.append(fn(chunk)[: min(B, len(t) - s)].to(torch.float64))
        return torch.cat(outs)

    def _separable_resize(self, node, src, in_shape, fn) -> bool:
        """Bilinear (linear, any ``align_corners``) resizing of a ``(C, H, W)`` tensor: ``R_h (x) R_w`` per
        channel, read off the op by pushing rows (columns) of ones through it, whose image is the
        column of ``R_h`` (``R_w``) when the other factor's rows sum to one; the chain
        dense -> transpose -> dense -> transpose is then checked against the op on the example and on a
        random input.  Its l2 norm is bounded by ``||R_h|| ||R_w||`` (exact for a Kronecker product)."""
        y = self.env[node]
        if len(in_shape) != 3 or y.dim() != 4:
            return False
        c, hi, wi = in_shape
        ho, wo = y.shape[2], y.shape[3]
        dev = self.env[src].device
        with torch.no_grad():
            try:
                dt = self.env[src].dtype
                rows = torch.zeros((hi, c, hi, wi), dtype=dt, device=dev)
                rows[torch.arange(hi), :, torch.arange(hi), :] = 1.0
                cols = torch.zeros((wi, c, hi, wi), dtype=dt, device=dev)
                cols[torch.arange(wi), :, :, torch.arange(wi)] = 1.0
                # in batches of the example's size: exported sizes often carry the example's batch size
                B = self.env[src].shape[0]
                out_r, out_c = self._batched(fn, rows, B), self._batched(fn, cols, B)
            except Exception:
                return False
        if tuple(out_r.shape[1:]) != (c, ho, wo) or tuple(out_c.shape[1:]) != (c, ho, wo):
            return False
        r_h = out_r[:, 0, :, 0].T.contiguous().cpu()  # (ho, hi)
        r_w = out_c[:, 0, 0, :].T.contiguous().cpu()  # (wo, wi)
        d_w = Dense(r_w, (c, hi, wi))
        swap1 = probe_select(lambda t: t.transpose(2, 3), (c, hi, wo), TRACE_BATCH, label="transpose")
        d_h = Dense(r_h, (c, wo, hi))
        swap2 = probe_select(lambda t: t.transpose(2, 3), (c, wo, ho), TRACE_BATCH, label="transpose")
        op = Chain([d_w, swap1, d_h, swap2])
        with torch.no_grad():
            t = torch.rand((3, c, hi, wi), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
            want = self._batched(fn, t.to(dev, self.env[src].dtype), self.env[src].shape[0]).cpu()
            got = op.to_double_copy().forward(t)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * (1 + float(want.abs().max()))):
            return False
        self._emit_checked(node, src, op, label="bilinear resize")
        return True

    def _concat(self, node, deps):
        if len(node.all_input_nodes) != len(deps) and not all(self.dep.get(a) for a in node.all_input_nodes):
            self._bad(node, "concatenation with constants")
            return
        y = self.env[node]
        if node.op == "call_module":
            axis = self.gm.get_submodule(node.target).axis
            order = list(node.args)
        else:
            axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            order = list(node.args[0])
        if axis < 0:
            axis += y.dim()
        if axis == 0:
            self._bad(node, "concatenation along the batch axis")
            return
        self._emit(node, "concat", order, axis - 1)

    # -- element-wise max / min ------------------------------------------------------------------
    def _minmax_kind(self, node) -> str | None:
        """'max' / 'min' for an element-wise maximum / minimum of tensors, else None."""
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            if type(mod).__name__ == "OnnxMinMax":
                return {"Max": "max", "Min": "min"}.get(getattr(mod, "_op_type", None))
            return None
        if node.op == "call_function":
            return {torch.maximum: "max", torch.fmax: "max", torch.minimum: "min", torch.fmin: "min"}.get(node.target)
        if node.op == "call_method":
            return {"maximum": "max", "minimum": "min"}.get(node.target)
        return None

    def _minmax_const(self, node, src) -> bool:
        """``max(x, c)`` / ``min(x, c)`` with a constant ``c`` (e.g. a ReLU clipped at learned per-unit
        thresholds): an element-wise monotone map with slope in [0, 1], constant where ``x <= c``
        (max) or ``x >= c`` (min)."""
        kind = self._minmax_kind(node)
        if kind is None:
            return False
        others = [a for a in node.args if a is not src]
        if len(others) != 1 or len(node.args) != 2 or node.kwargs:
            return False
        c = self.env[others[0]] if isinstance(others[0], fx.Node) else others[0]
        if isinstance(c, (int, float)):
            c = torch.tensor(float(c))
        if not isinstance(c, torch.Tensor) or not c.is_floating_point():
            return False
        x = self.env[src]
        per = c
        if c.dim() == x.dim():
            if c.shape[0] != 1:
                return False
            per = c[0]
        if c.dim() > x.dim():
            return False
        try:
            if tuple(torch.broadcast_shapes(per.shape, tuple(x.shape[1:]))) != tuple(x.shape[1:]):
                return False
        except RuntimeError:
            return False
        f = torch.maximum if kind == "max" else torch.minimum

        def fn(t, c=per, f=f):
            return f(t, c.to(device=t.device, dtype=t.dtype))

        with torch.no_grad():
            if not torch.equal(fn(x), self.env[node]):
                return False
        act = Activation(f"{kind}(x, const)", fn, 0.0, 1.0,
                         const_below=per if kind == "max" else None, const_above=per if kind == "min" else None)
        self._emit(node, "activation", [src], act)
        return True

    def _minmax_pattern(self, node, deps) -> bool:
        """The ONNX export of GroupSort-2 (``MinMax``): ``x`` sliced into even/odd channels ``a, b``,
        ``max(a, b)`` and ``min(a, b)`` interleaved back (unsqueeze / concat / reshape).  The whole
        pattern becomes one ``minmax`` node after checking numerically that it computes ``minmax(x)``
        and that no intermediate value is used elsewhere."""
        kind = self._minmax_kind(node)
        if kind is None or len(deps) != 2 or len(node.args) != 2:
            return False
        a, b = deps
        srcs = set()
        for n in (a, b):
            ds = [d for d in n.all_input_nodes if self.dep.get(d, False)]
            if len(ds) != 1:
                return False
            srcs.add(ds[0])
        if len(srcs) != 1:
            return False
        x = srcs.pop()
        if self.index.get(x) is None or not isinstance(self.env.get(x), torch.Tensor):
            return False
        xv = self.env[x]
        if xv.dim() < 2 or xv.shape[1] % 2:
            return False
        partner = [u for u in a.users if u is not node and self._minmax_kind(u) not in (None, kind)
                   and set(u.all_input_nodes) == {a, b}]
        if len(partner) != 1:
            return False
        order = list(self.gm.graph.nodes)
        start = order.index(node)
        local = dict(self.env)
        region = {a, b}
        from_max, from_min = {node if kind == "max" else partner[0]}, {partner[0] if kind == "max" else node}
        out = None
        for n in order[start:start + 80]:
            if n.op in ("output", "placeholder"):
                break
            try:
                if n.op == "get_attr":
                    obj = self.gm
                    for part in n.target.split("."):
                        obj = getattr(obj, part)
                    local[n] = obj
                    continue
                local[n] = self._run(n, local)
            except Exception:
                break
            ins = set(n.all_input_nodes)
            if not ins & region or self._is_shape_op(n):
                continue
            region.add(n)
            if ins & from_max:
                from_max.add(n)
            if ins & from_min:
                from_min.add(n)
            v = local[n]
            if n in from_max and n in from_min and isinstance(v, torch.Tensor) and v.shape == xv.shape:
                out = n
                break
        if out is None:
            return False
        # nothing inside the pattern may be used outside it
        for n in region - {out}:
            for u in n.users:
                if u not in region and not self._is_shape_op(u):
                    return False
        # numerical check on the example and on a random input
        g = torch.Generator().manual_seed(7)
        t = torch.randn(xv.shape, generator=g, dtype=xv.dtype).to(xv.device)
        with torch.no_grad():
            if not torch.equal(local[out], minmax(xv)):
                return False
            loc2 = dict(local)
            loc2[x] = t
            for n in order[min(order.index(a), order.index(b)):order.index(out) + 1]:
                if n.op == "get_attr":
                    continue
                try:
                    loc2[n] = self._run(n, loc2)
                except Exception:
                    return False
            if not torch.allclose(loc2[out], minmax(t), rtol=0, atol=1e-6 * float(t.abs().max())):
                return False
        self.index[out] = len(self.nodes)
        names = [n.name for n in order if n in region]
        self.nodes.append(Node(out.name, "minmax", [self.index[x]], tuple(xv.shape[1:]), None, names))
        self._absorbed.update(region - {a, b, out})
        self._pre_emitted.add(out)
        return True

    def _emit_checked(self, node, src, op: LinearOp, label: str | None = None):
        """Emit a linear node after checking that the op reproduces the model's own output."""
        with torch.no_grad():
            got = op.forward(self.env[src])
            want = self.env[node]
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * (1 + float(want.abs().max()))):
            self._bad(node, "could not reproduce the op")
            return
        if label and hasattr(op, "label"):
            op.label = label
        self._emit(node, "linear", [src], op)


def _aten_name(node) -> str | None:
    """``layer_norm`` for ``aten.layer_norm.default`` and the like; None for other targets."""
    t = node.target
    name = getattr(t, "__name__", "") or ""
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return None if "." not in name else name.split(".")[0]


class _NotConst(Exception):
    pass


def _num(v):
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise _NotConst()
        return float(v)
    return float(v)


def _pair(v):
    if isinstance(v, (tuple, list)):
        return tuple(int(a) for a in v) if len(v) > 1 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def _axis_subsets(nd: int):
    """Non-empty subsets of ``range(nd)``, the trailing ones (the usual spatial means) first."""
    import itertools

    subsets = [tuple(c) for r in range(1, nd + 1) for c in itertools.combinations(range(nd), r)]
    return sorted(subsets, key=lambda c: (-min(c), len(c)))


def _select_label(name: str) -> str:
    n = name.lower().replace("onnx", "")
    for key in ("reshape", "flatten", "transpose", "permute", "slice", "pad", "squeeze", "unsqueeze",
                "gather", "getitem", "view", "cast", "dropout", "identity", "expand", "tile"):
        if key in n:
            return {"getitem": "slice", "view": "reshape", "cast": "identity", "dropout": "identity"}.get(key, key)
    return n


def strip_to_logits(gm: fx.GraphModule, logits_node: str) -> fx.GraphModule:
    """Rewire ``gm`` so that it returns the named node (the logits before a stripped Softmax)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    target = next(n for n in gm.graph.nodes if n.name == logits_node)
    cur = out.args[0]
    if isinstance(cur, (tuple, list)):
        cur = cur[0]
    if cur is target:
        return gm
    out.args = (target,)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def build_graph(gm: fx.GraphModule, input_shape: tuple[int, ...], path: str | None = None,
                example: torch.Tensor | None = None, keep_params: bool = False) -> LipschitzGraph:
    """Walk ``gm`` on an example batch and return the (unsimplified) Lipschitz graph.

    ``keep_params=True``: dense and convolution operators reference the module's live
    ``nn.Parameter`` weights instead of detached copies, so that ``op.apply`` is differentiable with
    respect to them (used by certified fine-tuning; the default builds a frozen snapshot).
    """
    if example is None:
        g = torch.Generator().manual_seed(0)
        example = torch.rand((TRACE_BATCH,) + tuple(input_shape), generator=g)
    with torch.no_grad():
        return _Builder(gm, input_shape, path, keep_params=keep_params).build(example)
