"""Where a node of the Lipschitz graph comes from, in the words of the user's own model.

The graph's node names are fx names (``mul_1``, or onnx2torch's mangled
``features_features_1_features_1_0_block_block_1_mul``), which the user never wrote.  A message about
a node should name the module it belongs to by its path in the user's model (``features.1.0.block.1``)
and say what that module is (a squeeze-excitation gate, a LayerNorm, self-attention):

* for a traced ``nn.Module`` (state dict + ``--arch``, a module given to :func:`lipverify.load`), the
  fx node's ``nn_module_stack`` names the innermost module that computed it, and its class;
* for an ONNX file, the exporter's scope name (``/features/features.1/features.1.0/block/block.1/Mul``)
  is kept by :func:`record_onnx_names` when the file is converted and decoded by
  :func:`onnx_scope_path` (each scope level is the attribute path inside its parent, cumulative
  within one container: ``features``, ``features.1``, ``features.1.0``, then ``block``, ``block.1``).

Warnings
--------
Files from other exporters name their nodes freely: their names are shown as they are.
"""

from __future__ import annotations

#: module classes (by name) and what they are, for messages
KINDS = {
    "SqueezeExcitation": "squeeze-excitation gate", "SqueezeExcite": "squeeze-excitation gate",
    "SEModule": "squeeze-excitation gate", "SELayer": "squeeze-excitation gate", "EffectiveSEModule":
    "squeeze-excitation gate", "LayerNorm": "LayerNorm", "LayerNorm2d": "LayerNorm", "GroupNorm": "GroupNorm",
    "MultiheadAttention": "self-attention", "Attention": "self-attention", "WindowAttention": "self-attention",
    "ShiftedWindowAttention": "self-attention", "ShiftedWindowAttentionV2": "self-attention",
    "EncoderBlock": "transformer encoder block", "TransformerEncoderLayer": "transformer encoder layer",
}

#: what a node kind of the graph is, when the module says nothing more
NODE_KINDS = {"mul": "product gate (e.g. squeeze-excitation)", "normalization": "normalisation",
              "attention": "self-attention"}
#: normalisations by their graph op's name
NORM_KINDS = {"layer_norm": "LayerNorm", "group_norm": "GroupNorm", "instance_norm": "InstanceNorm"}


def onnx_scope_path(name: str) -> str | None:
    """``/features/features.1/features.1.0/block/block.1/Mul`` -> ``features.1.0.block.1``; None for a
    name that is not a scope path."""
    if not name or not name.startswith("/"):
        return None
    parts = [p for p in name.split("/")[1:-1] if p]
    if not parts:
        return None
    full, prev = "", None
    for c in parts:
        if prev is not None and c.startswith(prev + "."):
            full = full[: len(full) - len(prev)] + c
        else:
            full = f"{full}.{c}" if full else c
        prev = c
    return full


def record_onnx_names(gm, model) -> None:
    """Remember, on the converted module ``gm``, the ONNX node name behind each of its submodules
    (onnx2torch names them by the node's name with dots made slashes, numbered when repeated)."""
    names: dict[str, str] = {}
    seen: dict[str, int] = {}
    for node in model.graph.node:
        base = (f"{node.domain}/" + (node.name.replace(".", "/") or node.op_type)).lstrip("/")
        k = seen.get(base, 0)
        seen[base] = k + 1
        names[base + (f"_{k}" if k else "")] = node.name
    try:
        gm.onnx_node_names = names
    except Exception:  # a module that refuses new attributes: messages fall back to fx names
        pass


def origin(gm, fx_name: str) -> tuple[str | None, str | None]:
    """``(module path, module class name)`` of the fx node ``fx_name`` of ``gm`` (either may be None)."""
    gm = getattr(gm, "wrapped", gm)  # a torch.export program inside lipverify's Unregistered wrapper
    fxn = next((n for n in getattr(gm, "graph", None).nodes if n.name == fx_name), None) \
        if hasattr(gm, "graph") else None
    if fxn is None:
        return None, None
    if fxn.op == "call_module":
        onnx_name = getattr(gm, "onnx_node_names", {}).get(str(fxn.target))
        if onnx_name is not None:
            return onnx_scope_path(onnx_name) or onnx_name, None
    stack = fxn.meta.get("nn_module_stack") if hasattr(fxn, "meta") else None
    if stack:
        path, (_, cls) = list(stack.items())[-1]
        cls_name = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].strip("'>"))
        if fxn.op == "call_module":
            try:
                sub = gm.get_submodule(fxn.target)
                return str(fxn.target), type(sub).__name__
            except AttributeError:
                pass
        return str(path), cls_name
    if fxn.op == "call_module":
        try:
            return str(fxn.target), type(gm.get_submodule(fxn.target)).__name__
        except AttributeError:
            return str(fxn.target), None
    return None, None


def describe_node(gm, node) -> str:
    """``squeeze-excitation gate at features.1.0.block.1 (SqueezeExcitation)`` for a graph node: what it
    is and where it is in the user's model (fx names when nothing better is known)."""
    path, cls = None, None
    for src in list(getattr(node, "sources", []) or [])[:1] or [node.name]:
        path, cls = origin(gm, src)
    what = KINDS.get(cls or "")
    if what is None and node.kind == "normalization":
        what = NORM_KINDS.get(getattr(node.op, "name", ""))
    what = what or NODE_KINDS.get(node.kind) or node.describe()
    if path is None:
        return f"{what} at node {node.name}"
    return f"{what} at {path}" + (f" ({cls})" if cls and cls not in what else "")


def describe_nodes(gm, nodes, shown: int = 3) -> str:
    """The first ``shown`` of ``nodes`` described, then ``and N more``."""
    parts = [describe_node(gm, n) for n in nodes[:shown]]
    more = len(nodes) - shown
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")
