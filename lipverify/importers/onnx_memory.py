"""How much memory an ONNX model's activations need, known before anything is converted or run.

:func:`estimate_memory` runs ONNX shape inference on a light copy of the model (large initializers
replaced by typed inputs) with the per-example input shape fixed.  Where the size of an output of an
op whose size is set by values (:data:`SIZE_FROM_VALUES`: ``Expand``, ``Tile``, ``ConstantOfShape``,
``Pad``, ``Resize``, ...) is still unknown, the small constant subgraphs exporters use to compute
pads, shapes and scales are evaluated with onnx's reference evaluator (only nodes whose outputs shape
inference knows to be small), ``Shape``/``Size`` of statically shaped values become constants, and
shape inference runs again.  The activations of every value are then summed and compared with the
memory limit (:func:`lipverify.limits.check_alloc`) for each batch the import runs.

Warnings
--------
Refused with :class:`~lipverify.errors.UserInputError` (exit 2, one line naming the file): shape
inference failing, activations over the memory limit, and an output of an op in
:data:`SIZE_FROM_VALUES` whose size is still unknown (computed from the input's values, say: an
allocation bomb cannot be told from a legitimate model before it runs).  Unknown sizes of other ops,
which follow from their inputs' sizes, are not counted.
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


def _value_shapes(inferred):
    """``(producer node or None, name, dims or None, elem_type)`` of the input and of every value a
    node produces (dims None: not known statically)."""
    g = inferred.graph
    info = {v.name: v for v in list(g.input[:1]) + list(g.value_info) + list(g.output)}
    names = [g.input[0].name] if len(g.input) else []
    producer = {}
    for n in g.node:
        for o in n.output:
            if o and o not in producer:
                producer[o] = n
                names.append(o)
    for name in names:
        v = info.get(name)
        tt = v.type.tensor_type if v is not None and v.type.HasField("tensor_type") else None
        dims = None
        if tt is not None and tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            dims = None if any(d is None for d in dims) else dims
        yield producer.get(name), name, dims, (tt.elem_type if tt is not None else 0)


def _value_sized_unknown(inferred) -> bool:
    return any(dims is None and n is not None and n.op_type in SIZE_FROM_VALUES
               for n, _, dims, _ in _value_shapes(inferred))


#: never evaluated while folding constants (their values are not constants)
_NOT_FOLDED = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "Dropout"})


def _fold_and_infer(skel, inferred, path, rounds: int = 8):
    """Evaluate the small constant part of ``skel`` (nodes whose inputs are small constants and whose
    outputs shape inference knows to have at most ``_SMALL`` elements: the pads, shapes and scales
    exporters compute with ``ConstantOfShape``, ``Concat``, ``Transpose``, ``Where``, ...) with onnx's
    reference evaluator, and ``Shape``/``Size`` of values whose shape is static (the input's is fixed
    here) from that shape; replace them by initializers and infer again, for at most ``rounds`` rounds."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    for _ in range(rounds):
        shapes = {name: dims for _, name, dims, _ in _value_shapes(inferred)}
        for v in inferred.graph.input:
            d = [x.dim_value if x.HasField("dim_value") else None for x in v.type.tensor_type.shape.dim]
            shapes[v.name] = None if any(x is None for x in d) else d
        small = {name for name, dims in shapes.items() if dims is not None and math.prod(dims) <= _SMALL}
        avail = {t.name for t in skel.graph.initializer}
        fold, folded, known = [], set(), []
        for k, n in enumerate(skel.graph.node):
            if n.op_type in ("Shape", "Size") and n.domain in ("", "ai.onnx") and n.input \
                    and shapes.get(n.input[0]) is not None:  # the input's shape is static: a constant
                dims = shapes[n.input[0]]
                if n.op_type == "Size":
                    value = np.array(math.prod(dims), np.int64)
                else:
                    at = {a.name: a.i for a in n.attribute}
                    value = np.array(dims[at.get("start", 0):at.get("end", len(dims))] if "end" in at
                                     else dims[at.get("start", 0):], np.int64)
                known.append(numpy_helper.from_array(value, n.output[0]))
                folded.add(k)
                avail.add(n.output[0])
                continue
            if n.op_type in _NOT_FOLDED or n.domain not in ("", "ai.onnx") or has_subgraph(n):
                continue
            if all(i == "" or i in avail for i in n.input) and all(o in small for o in n.output if o):
                fold.append(n)
                folded.add(k)
                avail.update(o for o in n.output if o)
        if not folded:
            break
        outs = [o for n in fold for o in n.output if o]
        values = []
        if fold:
            g = helper.make_graph(fold, "constants", [], [helper.make_empty_tensor_value_info(o) for o in outs],
                                  list(skel.graph.initializer) + known)
            try:
                values = ReferenceEvaluator(helper.make_model(g, opset_imports=skel.opset_import,
                                                              ir_version=skel.ir_version)).run(None, {})
            except Exception:
                break
        kept = []
        for k, n in enumerate(skel.graph.node):
            if k not in folded:
                kept.append(type(n)())
                kept[-1].CopyFrom(n)  # detached from the field cleared below
        del skel.graph.node[:]
        skel.graph.node.extend(kept)
        skel.graph.initializer.extend(known)
        skel.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), o) for o, v in zip(outs, values))
        inferred = _infer(skel, path)
        if not _value_sized_unknown(inferred):
            break
    return inferred


def estimate_memory(model, declared_batch, per_example, path, runs) -> int:
    """Refuse (exit 2) when the activations of ``model`` exceed the memory limit for any of ``runs``:
    ``(batch, what, keep_all)``, where ``keep_all`` means every activation is kept at once (the fx
    import), else the largest two at a time (a plain forward pass).  Returns the bytes per example.

    Warnings
    --------
    Refuses a model for which shape inference fails, and one where it cannot tell the size of an
    output of an op in :data:`SIZE_FROM_VALUES`; unknown sizes of other ops (which follow from their
    inputs' sizes) are not counted.
    """
    b0 = declared_batch if isinstance(declared_batch, int) and declared_batch > 0 else 1
    skel = _skeleton(model, (b0,) + tuple(per_example))
    inferred = _infer(skel, path)
    if _value_sized_unknown(inferred):
        inferred = _fold_and_infer(skel, inferred, path)
    total = largest = 0
    for n, name, dims, elem_type in _value_shapes(inferred):
        if dims is None:
            if n is not None and n.op_type in SIZE_FROM_VALUES:
                raise UserInputError(f"the size of the output of node {n.name or name} ({n.op_type}) cannot be "
                                     "determined before running it; lipverify refuses to allocate it blindly",
                                     str(path))
            continue
        size = packed_nbytes(math.prod(dims), itemsize_bits(elem_type) or 32)
        total += size
        largest = max(largest, size)
    per_total, per_largest = total / b0, largest / b0
    for batch, what, keep_all in runs:
        need = batch * (per_total if keep_all else 2 * per_largest)
        per = f"{fmt_bytes(per_total)} of activations" if keep_all else f"2 x {fmt_bytes(per_largest)} (largest)"
        check_alloc(need, f"{what}: {batch} examples x {per} (ONNX shape inference)", path)
    return int(per_total)


__all__ = ["SIZE_FROM_VALUES", "estimate_memory"]
