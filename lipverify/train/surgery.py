"""Model surgery for certified fine-tuning, applied to the fx ``GraphModule`` of an imported model.

* :func:`swap_relu` with ``kind="minmax"`` (``--activation minmax``): every ReLU becomes
  :class:`~lipverify.models.layers.MinMax` (GroupSort-2 over channel pairs; needs an even channel
  count); with ``kind="clip"`` (``--loss local``): every ReLU becomes a ReLU with learnable per-unit
  upper thresholds ``min(relu(x), theta)`` (:class:`ClippedReLU`, Huang et al. 2021).
* :func:`normalize_last_layer` (``--lln``): the dense layer that produces the logits gets its class rows
  normalised to unit l2 norm (a ``torch.nn.utils.parametrize`` parametrisation: the trained parameter is
  the unnormalised weight); :func:`bake` replaces the parametrisation by the normalised weight before
  export, so the exported network is a plain dense layer.

A ReLU module at path ``P`` is replaced *at the same path*, so the fine-tuned state dict keeps the
input model's key names; :func:`apply_plan` repeats the same replacements on a freshly built
``--arch`` network so that the written state dict can be loaded and checked.  All replacements are
exportable to ONNX (opset 17) and re-importable by :func:`lipverify.load` (MinMax as its Slice/Max/Min
pattern, the clipped ReLU as ``Relu`` + ``Min`` with a constant).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from lipverify.errors import UserInputError
from lipverify.models.layers import MinMax


class ClippedReLU(nn.Module):
    """``min(relu(x), theta)`` with a learnable threshold per unit (``theta`` has the per-example shape)."""

    def __init__(self, shape):
        super().__init__()
        self.theta = nn.Parameter(torch.ones(tuple(shape)))

    def forward(self, x):
        return torch.minimum(F.relu(x), self.theta)


class RowNormalize(nn.Module):
    """Parametrisation ``W -> W / (||W_i||_2 + 1e-12)`` (the LiResNet head, see
    :class:`~lipverify.models.layers.LastLayerNormalizedLinear`)."""

    def forward(self, w):
        return w / (w.norm(p=2, dim=1, keepdim=True) + 1e-12)


def _relu_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and type(gm.get_submodule(n.target)) is nn.ReLU:
            out.append(n)
        elif n.op == "call_function" and n.target in (F.relu, torch.relu) and not n.kwargs.get("inplace", False):
            out.append(n)
        elif n.op == "call_method" and n.target == "relu":
            out.append(n)
    return out


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path``.  Paths with dots are nested, except when ``root`` holds a
    direct child with that exact name (onnx2torch names modules like ``1/Relu``, dots included)."""
    if path in dict(root.named_children()):
        setattr(root, path, new)
        return
    parent = root
    parts = path.split(".")
    for p in parts[:-1]:
        parent = getattr(parent, p)
    setattr(parent, parts[-1], new)


def _shapes(gm: fx.GraphModule, example: torch.Tensor) -> dict[str, tuple]:
    vals = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if isinstance(r, torch.Tensor):
                vals[n.name] = r
            return r

    with torch.no_grad():
        _Rec(gm).run(example)
    return vals


def swap_relu(gm: fx.GraphModule, kind: str, example: torch.Tensor) -> list[dict]:
    """Replace every ReLU of ``gm`` (in place).  Returns the plan: one dict per replacement with the
    module ``path`` (``None`` for a functional ReLU), the new ``kind`` and the per-example ``shape``.

    ``example``: a batch of inputs *to gm* (after any outside normalisation); for ``kind="clip"`` the
    thresholds are initialised to the largest activation each unit reaches on it (so the function is
    unchanged on those inputs), at least ``1e-2``.
    """
    if kind not in ("minmax", "clip"):
        raise ValueError(kind)
    nodes = _relu_nodes(gm)
    if not nodes:
        raise UserInputError("the model has no ReLU to replace"
                             + (" (--activation minmax)" if kind == "minmax" else " (--loss local needs ReLUs)"))
    vals = _shapes(gm, example)
    plan = []
    bad = []
    for k, n in enumerate(nodes):
        v = vals[n.name]
        shape = tuple(v.shape[1:])
        path = n.target if n.op == "call_module" else None
        if kind == "minmax":
            if len(shape) == 0 or shape[0] % 2:
                bad.append(f"{n.name} ({shape[0] if shape else 1} channels)")
                continue
            mod = MinMax()
            if path is not None:
                _set_module(gm, path, mod)
            else:
                path = f"lipverify_minmax_{k}"
                gm.add_submodule(path, mod)
                n.op, n.target, n.args, n.kwargs = "call_module", path, (n.args[0],), {}
            plan.append({"path": path, "kind": "minmax", "shape": list(shape),
                         "functional": n.op != "call_module" or path.startswith("lipverify_")})
        else:
            mod = ClippedReLU(shape).to(v.device)
            with torch.no_grad():
                hi = v.amax(0)
                floor = max(float(hi.max()) * 0.05, 1e-2)
                mod.theta.copy_(hi.clamp_min(floor))
            functional = path is None
            if functional:
                path = f"lipverify_clip_{k}"
                gm.add_submodule(path, mod)
            else:
                _set_module(gm, path, mod)
            src = n.args[0]
            g = gm.graph
            with g.inserting_before(n):
                relu = g.call_function(F.relu, (src,))
                th = g.get_attr(f"{path}.theta")
                mn = g.call_function(torch.minimum, (relu, th))
            n.replace_all_uses_with(mn)
            g.erase_node(n)
            plan.append({"path": path, "kind": "clip", "shape": list(shape), "functional": functional})
    if bad:
        raise UserInputError("--activation minmax needs an even number of channels at every ReLU; odd at: "
                             + ", ".join(bad))
    gm.graph.lint()
    gm.recompile()
    return plan


def _logits_module(gm: fx.GraphModule) -> tuple[str, nn.Linear]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0]
    if isinstance(node, (tuple, list)):
        node = node[0]
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.Linear):
                return node.target, mod
            name = type(mod).__name__
            if name in ("Flatten", "Identity", "OnnxReshape", "OnnxFlatten", "OnnxSqueezeStaticAxes",
                        "OnnxCopyIdentity") and len(node.all_input_nodes) >= 1:
                node = node.args[0]
                continue
        break
    raise UserInputError("--lln needs the logits to come from a dense layer (Linear / Gemm)")


def normalize_last_layer(gm: fx.GraphModule) -> str:
    """Parametrise the logits layer's weight with unit-norm class rows (in place); returns its path."""
    path, lin = _logits_module(gm)
    if not parametrize.is_parametrized(lin, "weight"):
        parametrize.register_parametrization(lin, "weight", RowNormalize())
    return path


def bake(gm: nn.Module) -> None:
    """Replace parametrised weights by their current value (plain parameters; same function)."""
    for m in list(gm.modules()):
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)


def apply_plan(net: nn.Module, plan: list[dict], lln_path: str | None = None) -> nn.Module:
    """Repeat the module replacements of ``plan`` on ``net`` (e.g. a fresh ``--arch`` network), so that
    the fine-tuned state dict loads into it.  Functional ReLUs cannot be replaced from outside: a
    :class:`~lipverify.errors.UserInputError` says so."""
    for p in plan:
        if p.get("functional"):
            raise UserInputError(f"a functional ReLU was replaced ({p['path']}); the state dict only fits the "
                                 "fine-tuned fx graph, not the --arch network")
        new = MinMax() if p["kind"] == "minmax" else ClippedReLU(p["shape"])
        _set_module(net, p["path"], new)
    return net


def describe_plan(plan: list[dict], lln_path: str | None) -> list[str]:
    notes = []
    mm = [p["path"] for p in plan if p["kind"] == "minmax"]
    cl = [p["path"] for p in plan if p["kind"] == "clip"]
    if mm:
        notes.append(f"activation surgery: {len(mm)} ReLU(s) replaced by MinMax (GroupSort-2) at {', '.join(mm)}")
    if cl:
        notes.append(f"activation surgery: {len(cl)} ReLU(s) replaced by ReLU clipped at learned per-unit "
                     f"thresholds (min(relu(x), theta)) at {', '.join(cl)}")
    if lln_path:
        notes.append(f"last-layer normalisation: class rows of {lln_path} scaled to unit l2 norm "
                     "(baked into the exported weights)")
    return notes


def count_units(plan: list[dict]) -> int:
    return sum(int(math.prod(p["shape"])) for p in plan)
