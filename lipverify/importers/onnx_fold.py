"""Constant folding of ONNX graphs before conversion.

Exporters write some weights as computations on other weights: weight-standardised convolutions
(timm's ``ScaledStdConv2d`` in NF-ResNets and NFNets, BiT's ``StdConv2d``) export a
``BatchNormalization`` in *training* mode applied to the constant weight tensor; weight normalisation
exports ``g * v / ||v||``; spectral-norm parametrisations export their power iteration; transposed or
reshaped constant weights export ``Transpose`` / ``Reshape`` of an initializer.  onnx2torch cannot
convert some of these (a ``BatchNormalization`` with mean/var outputs) and the Lipschitz graph would see
products of weights as input-dependent operations.

Every node whose inputs are all initializers (or that has no input, like ``Constant``) computes a
constant.  :func:`fold_constants` evaluates each such node once, in graph order (so whole constant
subgraphs fold), with the onnx library's reference evaluator on a one-node model under the original
opsets, and replaces it by initializers holding its outputs.  Then conversion sees plain weights.

Safety (the file may be hostile):

* only deterministic numeric operators of the default domain are evaluated (:data:`FOLDABLE`; no random
  generators, no control flow, no custom domains);
* the output shapes are inferred first (onnx shape inference with the constant inputs, data
  propagation on); a node whose output shape is not fully known is left alone, and the bytes of its
  outputs are checked against :data:`MAX_FOLD_ELEMENTS` and the memory limit
  (:func:`lipverify.limits.check_alloc`) *before* anything is evaluated: an ``Expand`` or
  ``ConstantOfShape`` to a huge declared shape is refused with the node named, never allocated;
* non-finite folded values are refused (a weight computed as ``0/0`` would otherwise become a NaN bound).

Warnings
--------
A node the reference evaluator cannot run is left as it was (conversion may then refuse it, naming it).
Folding never touches nodes that read the graph input, so it cannot change what the model computes
from its input; the fidelity check compares the converted module with onnxruntime on the original file.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from lipverify.errors import UserInputError
from lipverify.limits import check_alloc

#: operator types folded when every input is constant (deterministic, default domain)
FOLDABLE = frozenset("""
Abs Acos Add And ArgMax ArgMin Asin Atan BatchNormalization Cast CastLike Ceil Clip Concat Constant
ConstantOfShape Conv Cos Cosh CumSum Div Einsum Equal Erf Exp Expand Flatten Floor Gather GatherElements
GatherND Gemm Greater GreaterOrEqual HardSigmoid Identity InstanceNormalization LayerNormalization
LeakyRelu Less LessOrEqual Log LpNormalization MatMul Max Mean Min Mod Mul Neg Not Or Pad Pow Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Round Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign Split Sqrt Squeeze Sub Sum Tan Tanh Tile Transpose Trilu Unsqueeze Where Xor
""".split())

#: largest folded output (elements): a weight tensor larger than this is not a weight
MAX_FOLD_ELEMENTS = 1 << 28


def _mini_model(node, tensors: dict, opset_import):
    """A model of ``node`` alone, its inputs as initializers (``tensors``: TensorProtos by name)."""
    from onnx import helper

    inits = [tensors[i] for i in dict.fromkeys(x for x in node.input if x)]
    outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    return helper.make_model(helper.make_graph([node], "fold", [], outs, initializer=inits),
                             opset_imports=list(opset_import))


def _output_shapes(node, mini) -> list | None:
    """Inferred ``(shape, np.dtype)`` of every output of ``node`` (in its one-node model ``mini``), or
    None when some shape is not fully known."""
    import onnx
    from onnx import helper

    try:
        inferred = onnx.shape_inference.infer_shapes(mini, strict_mode=False, data_prop=True)
    except Exception:
        return None
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    res = []
    for o in node.output:
        if not o:
            continue
        v = known.get(o)
        if v is None or not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            return None
        tt = v.type.tensor_type
        dims = []
        for d in tt.shape.dim:
            if not d.HasField("dim_value") or d.dim_value < 0:
                return None
            dims.append(int(d.dim_value))
        try:
            dt = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            return None
        res.append((tuple(dims), dt))
    return res


def _evaluate(mini) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    try:
        got = ReferenceEvaluator(mini).run(None, {})
    except Exception:
        return None
    return [np.asarray(a) for a in got]


def fold_constants(model, path=None) -> tuple[int, Counter]:
    """Fold, in place, every node of ``model.graph`` whose inputs are all constant (see the module
    docstring).  Returns the number of nodes folded and a count by operator type.

    Raises :class:`~lipverify.errors.UserInputError` for a constant whose declared size exceeds the
    limits or whose values are not finite.
    """
    from onnx import numpy_helper

    g = model.graph
    outputs = {o.name for o in g.output}
    by_name = {i.name: i for i in g.initializer}

    kept = []
    count: Counter = Counter()
    for i, n in enumerate(g.node):
        ins = [x for x in n.input if x]
        foldable = (n.domain in ("", "ai.onnx") and n.op_type in FOLDABLE and all(x in by_name for x in ins)
                    and not any(o in outputs for o in n.output) and not any(a.g.node or a.graphs for a in n.attribute))
        if not foldable:
            kept.append(n)
            continue
        mini = _mini_model(n, by_name, model.opset_import)
        shapes = _output_shapes(n, mini)
        if shapes is None:
            kept.append(n)
            continue
        label = f"node {n.name or '#' + str(i)} ({n.op_type})"
        total = 0
        for shp, dt in shapes:
            elems = math.prod(shp)
            if elems > MAX_FOLD_ELEMENTS:
                raise UserInputError(f"{label} declares a constant of {elems} elements (shape {list(shp)}); "
                                     f"more than {MAX_FOLD_ELEMENTS} is not a weight", None if path is None else str(path))
            total += elems * dt.itemsize
        check_alloc(total, f"folding the constant {label}", path)
        got = _evaluate(mini)
        if got is None:
            kept.append(n)
            continue
        for o, arr in zip([o for o in n.output if o], got):
            if arr.dtype.kind == "f" and arr.size and not bool(np.isfinite(arr).all()):
                raise UserInputError(f"{label} computes a constant with non-finite values (NaN or inf)",
                                     None if path is None else str(path))
            t = numpy_helper.from_array(np.ascontiguousarray(arr), o)
            g.initializer.append(t)
            by_name[o] = t
        count[n.op_type] += 1
    folded = sum(count.values())
    if folded:
        del g.node[:]
        g.node.extend(kept)
    return folded, count
