"""How much memory an ONNX model's activations need, known before anything is converted or run.

:func:`estimate_memory` runs ONNX shape inference on a light copy of the model (large initializers
replaced by typed inputs) with the input's shape fixed: the per-example shape, and the batch of the
run the estimate is for (when the file's batch dimension is symbolic; else the file's own).  Where a
size is still unknown (ONNX's inference does not compute ``Mod``, ``Div``, ``ReduceProd``, ... of
shapes, so that the window padding of a Swin transformer, say, stays unknown), one pass over the
graph in its order completes it: ``Shape``/``Size`` of a value whose shape is static are constants,
the small shape arithmetic (:data:`_FOLDED`: ``Gather``, ``Concat``, ``Mod``, ``Where``, ...) on
constants is evaluated (numpy, or onnx's reference implementation; at most ``_SMALL`` elements), and
each node whose output shape is unknown is inferred alone with its constant inputs' values.  So every
size that follows from the input's shape is known, however many Pad nodes depend on earlier ones;
sizes that follow from the input's values (or from large initializers) never are.  The activations
of every value are then summed and compared with the memory limit (:func:`lipverify.limits.check_alloc`)
for each batch the import runs.

Warnings
--------
Refused with :class:`~lipverify.errors.UserInputError` (exit 2, one line naming the file): shape
inference failing, activations over the memory limit, and an output of an op in
:data:`SIZE_FROM_VALUES` whose size is still unknown (computed from the input's values, say: an
allocation bomb cannot be told from a legitimate model before it runs).  Unknown sizes of other ops,
which follow from their inputs' sizes, are not counted.  Local functions and ops of other domains
keep what inference of the whole graph says about them.
"""

from __future__ import annotations

import math

import numpy as np

from lipverify.errors import UserInputError
from lipverify.importers.onnx_safety import has_subgraph, itemsize_bits, packed_nbytes
from lipverify.limits import check_alloc, fmt_bytes

#: initializers up to this many elements are kept for shape inference (shapes, axes, pads)
_SMALL = 1024
#: ops whose output size is set by the values of their inputs or attributes, not by the input's shape
SIZE_FROM_VALUES = frozenset({"Expand", "Tile", "ConstantOfShape", "Range", "Resize", "Upsample", "Pad", "OneHot",
                              "CenterCropPad", "Col2Im", "EyeLike", "RandomNormal", "RandomUniform",
                              "RandomNormalLike", "RandomUniformLike", "Multinomial", "ReverseSequence"})


def _skeleton(model, input_dims):
    """A copy of ``model`` for shape inference: the input's dimensions fixed, large initializers and
    constants replaced by typed inputs (shape inference reads only the small ones' values)."""
    import onnx
    from onnx import helper

    g = model.graph
    inits = {i.name for i in g.initializer}
    s = onnx.ModelProto()
    s.ir_version = model.ir_version
    s.opset_import.extend(model.opset_import)
    s.functions.extend(model.functions)
    sg = s.graph
    for i in g.input:
        if i.name in inits:
            continue
        v = helper.make_tensor_value_info(i.name, i.type.tensor_type.elem_type, list(input_dims))
        sg.input.append(v)
    for t in g.initializer:
        if math.prod(t.dims) <= _SMALL:
            sg.initializer.append(t)
        else:
            sg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t") \
                and math.prod(n.attribute[0].t.dims) > _SMALL and len(n.output) == 1:
            t = n.attribute[0].t
            sg.input.append(helper.make_tensor_value_info(n.output[0], t.data_type, list(t.dims)))
            continue
        sg.node.append(n)
    for o in g.output:
        sg.output.append(helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None))
    return s


def _infer(skel, path):
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(skel, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"ONNX shape inference failed ({first[:200]}); lipverify cannot tell how much memory "
                             "the model needs", str(path)) from None


def _static(tp):
    """The dimensions of a ``TypeProto``'s tensor type when all are known (None otherwise)."""
    if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tp.tensor_type.shape.dim:
        if not d.HasField("dim_value") or d.dim_value < 0:
            return None
        dims.append(d.dim_value)
    return dims


#: ops evaluated on constants (small initializers and ``Constant`` nodes, ``Shape``/``Size`` of values whose
#: shape is static): the shape arithmetic exporters write to compute pads, shapes, scales and indices
_FOLDED = frozenset({
    "Constant", "Identity", "Shape", "Size", "Gather", "GatherElements", "GatherND", "Slice", "Concat", "Split",
    "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Cast", "CastLike", "Add", "Sub", "Mul", "Div",
    "Mod", "Pow", "Neg", "Abs", "Sign", "Floor", "Ceil", "Round", "Sqrt", "Reciprocal", "Clip", "Relu", "Min",
    "Max", "Sum", "Mean", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or",
    "Xor", "Where", "ReduceProd", "ReduceSum", "ReduceMin", "ReduceMax", "ReduceMean", "ArgMax", "ArgMin",
    "ConstantOfShape", "Range", "Expand", "Tile", "Pad", "ScatterND", "ScatterElements", "CumSum", "Trilu",
})


def _int_axes(v):
    return tuple(int(a) for a in np.ravel(v))


def _fast(op, n, args):
    """The outputs of the commonest shape-arithmetic ops, computed with numpy (None: use onnx's
    reference implementation)."""
    from onnx import helper

    at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    x = args[0] if args else None
    with np.errstate(all="ignore"):
        if op == "Identity":
            return [x]
        if op == "Unsqueeze":
            axes = args[1] if len(args) > 1 else at.get("axes")
            return None if axes is None else [np.expand_dims(x, _int_axes(axes))]
        if op == "Squeeze":
            axes = args[1] if len(args) > 1 else at.get("axes")
            return [np.squeeze(x, axis=None if axes is None else _int_axes(axes))]
        if op == "Concat" and "axis" in at and len({a.dtype for a in args}) == 1:
            return [np.concatenate(args, axis=at["axis"])]
        if op == "Gather" and args[1].dtype.kind == "i":
            return [np.take(x, args[1], axis=at.get("axis", 0))]
        if op == "Cast" and at.get("to") in _CAST and len(at) == 1:
            return [x.astype(_CAST[at["to"]])]
        if op in _BINARY and x.dtype == args[1].dtype and x.dtype.kind in "iu":
            return [np.asarray(_BINARY[op](x, args[1]))]
    return None


#: ``Cast`` targets computed with numpy: float, int32, int64, bool, float16, double
_CAST = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64}
_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}
_CONSTANT_ATTRS = {"value": None, "value_int": np.int64, "value_ints": np.int64, "value_float": np.float32,
                   "value_floats": np.float32}


def _propagate(skel, inferred):
    """Static dimensions and element types of the values of ``skel`` (the input's shape fixed): those
    of ``inferred`` (ONNX shape inference of the whole graph), completed in one pass in graph order
    where a shape is unknown there.

    Each node of the default domain whose output shape is unknown is inferred alone, given its
    inputs' types and the values of those of its inputs that are constants; a node of :data:`_FOLDED`
    whose inputs are all constants and whose outputs have at most ``_SMALL`` elements is evaluated
    (numpy, or onnx's reference implementation), and ``Shape``/``Size`` of a value with a static shape
    is that shape.  Constants are thus the small initializers and ``Constant`` nodes and what follows
    from them and from shapes: never from the input's values, nor from large initializers (typed
    inputs here)."""
    from onnx import defs, helper, numpy_helper, shape_inference
    from onnx.reference import ReferenceEvaluator

    g = inferred.graph
    types = {}
    for t in skel.graph.initializer:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
    for v in list(g.input) + list(g.value_info) + list(g.output):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type
    dims = {name: _static(tp) for name, tp in types.items()}
    protos = {t.name: t for t in skel.graph.initializer}  # constants as TensorProto (inference's input data)
    arrays = {}  # constants as numpy arrays (the evaluators' inputs)

    def array(name):
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(protos[name])
        return arrays[name]

    def proto(name):
        if name not in protos:
            protos[name] = numpy_helper.from_array(arrays[name], name)
        return protos[name]

    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in skel.opset_import}
    schemas = {}
    for n in skel.graph.node:
        if n.domain not in ("", "ai.onnx") or has_subgraph(n):
            continue  # local functions and other domains: what inference of the whole graph says
        op = n.op_type
        ins = [i for i in n.input if i]
        outs = [o for o in n.output if o]
        if any(dims.get(o) is None for o in outs) and all(i in types for i in ins):
            if op not in schemas:
                try:
                    schemas[op] = defs.get_schema(op, opsets.get("", 1), "")
                except Exception:
                    schemas[op] = None
            if schemas[op] is not None:
                try:
                    got = shape_inference.infer_node_outputs(
                        schemas[op], n, {i: types[i] for i in ins},
                        {i: proto(i) for i in ins if i in protos or i in arrays},
                        opset_imports=skel.opset_import, ir_version=skel.ir_version)
                except Exception:
                    got = {}
                for o, tp in got.items():
                    if dims.get(o) is None and tp.HasField("tensor_type"):
                        types[o], dims[o] = tp, _static(tp)
        if op in ("Shape", "Size") and ins and dims.get(ins[0]) is not None:
            d = dims[ins[0]]
            if op == "Size":
                values = [np.array(math.prod(d), np.int64)]
            else:
                at = {a.name: a.i for a in n.attribute}
                values = [np.array(d[at.get("start", 0):at["end"]] if "end" in at else d[at.get("start", 0):],
                                   np.int64)]
        elif op == "Constant" and len(n.attribute) == 1 and n.attribute[0].name in _CONSTANT_ATTRS:
            a = n.attribute[0]
            values = [numpy_helper.to_array(a.t) if a.name == "value" else
                      np.array(helper.get_attribute_value(a), _CONSTANT_ATTRS[a.name])]
        elif op in _FOLDED and all(i in protos or i in arrays for i in ins) \
                and all(dims.get(o) is not None and math.prod(dims[o]) <= _SMALL for o in outs):
            try:
                args = [array(i) for i in ins]
                values = (_fast(op, n, args) if len(ins) == len(n.input) else None) \
                    or ReferenceEvaluator(n, opsets=opsets).run(None, dict(zip(ins, args)))
            except Exception:
                continue
        else:
            continue
        for o, v in zip(n.output, values):
            v = np.asarray(v)
            if not o or v.size > _SMALL:
                continue
            if dims.get(o) != list(v.shape):
                try:
                    types[o] = helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
                except Exception:  # strings, objects: not a size
                    continue
                dims[o] = list(v.shape)
            arrays[o] = v
            protos.pop(o, None)
    return types, dims


def _activations(skel, path):
    """``(total, largest)`` bytes of the input's and the nodes' output values of ``skel`` (the input's
    shape fixed); refuses an output of an op in :data:`SIZE_FROM_VALUES` whose size is unknown."""
    inferred = _infer(skel, path)
    g = inferred.graph
    types = {v.name: v.type for v in list(g.input[:1]) + list(g.value_info) + list(g.output)}
    names = [(None, g.input[0].name)] if len(g.input) else []
    names += [(n, o) for n in skel.graph.node for o in n.output if o]
    dims = {name: _static(tp) for name, tp in types.items()}
    if any(dims.get(name) is None for _, name in names):
        types, dims = _propagate(skel, inferred)
    total = largest = 0
    seen = set()
    for n, name in names:
        if name in seen:
            continue
        seen.add(name)
        d = dims.get(name)
        if d is None:
            if n is not None and n.op_type in SIZE_FROM_VALUES:
                raise UserInputError(f"the size of the output of node {n.name or name} ({n.op_type}) cannot be "
                                     "determined before running it; lipverify refuses to allocate it blindly",
                                     str(path))
            continue
        size = packed_nbytes(math.prod(d), itemsize_bits(types[name].tensor_type.elem_type) or 32)
        total += size
        largest = max(largest, size)
    return total, largest


def estimate_memory(model, declared_batch, per_example, path, runs) -> int:
    """Refuse (exit 2) when the activations of ``model`` exceed the memory limit for any of ``runs``:
    ``(batch, what, keep_all)``, where ``keep_all`` means every activation is kept at once (the fx
    import), else the largest two at a time (a plain forward pass).  Returns the bytes per example.

    The sizes are those of the batch of each run when the model's batch dimension is symbolic (every
    size computed from the input's shape, its batch included, is then a constant), else those of the
    model's own batch, scaled to the run's.

    Warnings
    --------
    Refuses a model for which shape inference fails, and one where it cannot tell the size of an
    output of an op in :data:`SIZE_FROM_VALUES`; unknown sizes of other ops (which follow from their
    inputs' sizes) are not counted.
    """
    fixed = declared_batch if isinstance(declared_batch, int) and declared_batch > 0 else None
    skel = _skeleton(model, (fixed or 1,) + tuple(per_example))
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in skel.graph.input if v.name not in inits]
    measured = {}

    def at(batch):  # (total, largest) bytes of the activations of a batch of `batch` examples
        b = fixed or batch
        if b not in measured:
            for v in inputs:
                v.type.tensor_type.shape.dim[0].dim_value = b
            measured[b] = _activations(skel, path)
        total, largest = measured[b]
        return total * batch / b, largest * batch / b

    per = None
    for batch, what, keep_all in runs:
        total, largest = at(batch)
        per = total / batch if per is None else per
        size = f"{fmt_bytes(total)} of activations" if keep_all else f"2 x {fmt_bytes(largest)} (the largest)"
        check_alloc(total if keep_all else 2 * largest, f"{what}: {batch} examples, {size} (ONNX shape inference)",
                    path)
    return int(at(fixed or 1)[0] / (fixed or 1) if per is None else per)


__all__ = ["SIZE_FROM_VALUES", "estimate_memory"]
