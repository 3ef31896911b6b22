"""Checks of an untrusted ONNX file, run before anything in it is converted, run or allocated.

An ONNX file from a stranger decides which files are read (external data), how much memory is
allocated (declared shapes, ``Expand``/``Tile``/``ConstantOfShape`` targets, the number of classes)
and how long the import takes (the number of nodes).  :func:`read_model` runs every check that needs
only the file, in this order:

1. the path is a regular file (not a device, FIFO or directory) of at most
   :data:`~lipverify.limits.MAX_MODEL_BYTES` and under protobuf's 2 GiB limit (and twice its size fits
   the memory limit), and parses as an ONNX protobuf with graph nodes;
2. :func:`check_structure`: at most :data:`~lipverify.limits.MAX_NODES` nodes, counting every call
   of a model-local function as its body; no control flow (``If``, ``Loop``, ``Scan``: any node with
   a subgraph, nested or not);
3. :func:`attach_external_data`: tensors stored outside the file are read from the model's own
   folder, whatever the working directory, and put into the tensors (``raw_data``), so that the
   checker, onnx2torch and onnxruntime all see one self-contained model;
4. :func:`check_tensors`: every tensor's data matches its shape and type, and no floating-point
   tensor holds NaN or an infinity (the largest magnitude is remembered for later messages);
5. :func:`check_io`: one input of element type float32, one output of a floating-point type.

Training information (``training_info``: graphs never run at inference) is dropped.  The memory the
activations need is estimated next, once the input shape is known, by
:func:`lipverify.importers.onnx_memory.estimate_memory`.

Warnings
--------
Refused with :class:`~lipverify.errors.UserInputError` (exit 2, one line naming the file):

* not a regular file, empty, over the size limit, not a protobuf, no nodes;
* more than ``MAX_NODES`` nodes (local functions expanded), local functions that call themselves or
  nest more than 64 deep; control-flow nodes (as :class:`~lipverify.errors.UnsupportedOpError`);
* external data whose location is absolute, contains ``..``, leaves the model's folder through a
  symbolic link (file or directory), is not a regular file, or whose offset and length lie past the
  end of the file or do not match the tensor's shape; string tensors stored outside the file; a
  model that with its external data exceeds protobuf's 2 GiB limit;
* tensor data that does not match the tensor's shape; NaN or infinite weights (naming the tensor);
* inputs that are not float32, more or fewer than one input or output, integer outputs;

Memory estimates count the tensors themselves, not the interpreter's overhead (see
:mod:`lipverify.limits`).  External data files are opened without following a final symbolic link
after their path was resolved, but a folder changed by someone else while lipverify reads it is
outside what these checks can guard against.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np

from lipverify.errors import UnsupportedOpError, UserInputError
from lipverify.limits import (
    MAX_MODEL_BYTES,
    MAX_NODES,
    check_alloc,
    check_regular,
    file_kind,
    fmt_bytes,
    read_capped,
    resolve_inside,
)

#: protobuf cannot serialise a message of 2 GiB or more (the checker and onnxruntime need one)
PROTOBUF_LIMIT = (2 << 30) - 1
_SUB_BYTE_BITS = {21: 4, 22: 4, 23: 4, 25: 2, 26: 2, 27: 6, 28: 6}
_FLOAT_NP = {1: "<f4", 10: "<f2", 11: "<f8"}  # FLOAT, FLOAT16, DOUBLE
_FLOAT_TYPES = {1, 10, 11, 16}  # + BFLOAT16


def type_name(elem_type: int) -> str:
    import onnx

    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"element type {elem_type}"


def itemsize_bits(elem_type: int) -> int | None:
    """Bits per element of an ONNX element type (None: strings or unknown)."""
    from onnx import helper

    if elem_type in _SUB_BYTE_BITS:
        return _SUB_BYTE_BITS[elem_type]
    if elem_type in (0, 8):
        return None
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize) * 8
    except Exception:
        return None


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` elements of ``bits`` bits each, packed (sub-byte types round up)."""
    return (numel * bits + 7) // 8


# -- 1. reading -----------------------------------------------------------------------------------
def read_model(path: Path):
    """The checked, self-contained model of ``path``, its serialised bytes (with external data
    attached) and the largest weight ``(magnitude, label)``: checks 1-4 of the module docstring
    (:func:`check_io` is separate).

    Warnings
    --------
    Refuses (exit 2) non-regular, empty or oversized files, files twice whose size exceeds the memory
    limit, unparsable protobufs and graphs without nodes, then whatever :func:`check_structure`,
    :func:`attach_external_data` and :func:`check_tensors` refuse.
    """
    import onnx

    cap = min(MAX_MODEL_BYTES, PROTOBUF_LIMIT)  # a protobuf cannot reach 2 GiB
    size = check_regular(path, "model file").st_size
    if size > cap:
        raise UserInputError(f"the model file is {fmt_bytes(size)}, over the limit of {fmt_bytes(cap)} (protobuf's "
                             "own)", str(path))
    check_alloc(2 * size, "reading and parsing the model file", path)
    data = read_capped(path, cap, "model file")
    try:
        model = onnx.load_from_string(data)
    except Exception:
        raise UserInputError("not a valid ONNX file (could not parse the protobuf; truncated or not ONNX?)",
                             str(path)) from None
    if len(model.graph.node) == 0:
        raise UserInputError("not a valid ONNX file (no graph nodes; truncated or not ONNX?)", str(path))
    check_structure(model, path)
    changed = False
    if len(model.training_info):  # training graphs never run at inference; they could reference files
        model.ClearField("training_info")
        changed = True
    changed |= attach_external_data(model, path)
    largest = check_tensors(model, path)
    return model, (model.SerializeToString() if changed else data), largest


# -- 2. structure ---------------------------------------------------------------------------------
def has_subgraph(node) -> bool:
    """Whether ``node`` carries a subgraph (``If``, ``Loop``, ``Scan``, ...)."""
    import onnx

    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) or a.HasField("g") or len(a.graphs)
               for a in node.attribute)


def count_nodes(model, path) -> int:
    """Nodes of the main graph, each call of a model-local function counted as its (expanded) body;
    stops counting past ``MAX_NODES``."""
    funcs = {(f.domain, f.name): f for f in model.functions}
    memo: dict = {}

    def size(nodes, stack: tuple) -> int:
        total = 0
        for n in nodes:
            total += 1
            key = (n.domain, n.op_type)
            if key in funcs:
                if key in stack:
                    raise UserInputError(f"model-local function {n.op_type!r} calls itself", str(path))
                if len(stack) >= 64:
                    raise UserInputError("model-local functions nest more than 64 deep", str(path))
                if key not in memo:
                    memo[key] = size(funcs[key].node, stack + (key,))
                total += memo[key]
            if total > MAX_NODES:
                return total
        return total

    return size(model.graph.node, ())


def check_structure(model, path) -> None:
    """At most ``MAX_NODES`` nodes (local functions expanded); no control flow (module docstring)."""
    n = count_nodes(model, path)
    if n > MAX_NODES:
        exact = len(model.graph.node)
        if exact > MAX_NODES:
            raise UserInputError(f"the model has {exact:,} nodes, over the limit of {MAX_NODES:,}", str(path))
        raise UserInputError(f"the model's local functions expand to more than {MAX_NODES:,} nodes (the limit)",
                             str(path))
    flows = [(f"{n.op_type} [control flow]", n.name or f"#{i}") for i, n in enumerate(model.graph.node)
             if has_subgraph(n)]
    flows += [(f"{n.op_type} [control flow in function {f.name}]", n.name or f"#{i}") for f in model.functions
              for i, n in enumerate(f.node) if has_subgraph(n)]
    if flows:
        more = len(flows) - 10
        raise UnsupportedOpError(flows[:10] + ([("...", f"{more} more")] if more > 0 else []), str(path))


# -- 3. external data -----------------------------------------------------------------------------
def _tensors(model):
    """``(label, TensorProto)`` of every tensor in the model (no subgraphs: refused before)."""
    g = model.graph
    for t in g.initializer:
        yield f"tensor {t.name!r}", t
    for s in g.sparse_initializer:
        yield f"sparse tensor {s.values.name!r} (values)", s.values
        yield f"sparse tensor {s.values.name!r} (indices)", s.indices
    for owner, nodes in [("", g.node)] + [(f" in function {f.name}", f.node) for f in model.functions]:
        for i, n in enumerate(nodes):
            for a in n.attribute:
                label = f"attribute {a.name!r} of node {n.name or '#' + str(i)} ({n.op_type}){owner}"
                if a.HasField("t"):
                    yield label, a.t
                for t in a.tensors:
                    yield label, t
                for sp in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                    yield label + " (values)", sp.values
                    yield label + " (indices)", sp.indices


def _numel(label: str, t, path) -> int:
    if any(d < 0 for d in t.dims):
        raise UserInputError(f"{label} has a negative dimension {list(t.dims)}", str(path))
    return math.prod(int(d) for d in t.dims)


def _nonneg_int(text: str, key: str, label: str, path) -> int:
    if not text.isdigit() or len(text) > 19:
        raise UserInputError(f"{label}: external data {key} {text[:40]!r} is not a non-negative integer", str(path))
    return int(text)


def _read_range(target: Path, offset: int, length: int, label: str, path) -> bytes:
    """``length`` bytes at ``offset`` of the resolved regular file ``target`` (no final link followed)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        raise UserInputError(f"{label}: cannot read its external data file ({exc.strerror or exc})",
                             str(path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserInputError(f"{label}: its external data file is {file_kind(st.st_mode)}", str(path))
        if offset + length > st.st_size:
            raise UserInputError(f"{label}: external data past the end of its file", str(path))
        chunks, pos = [], offset
        while pos < offset + length:
            chunk = os.pread(fd, min(offset + length - pos, 1 << 26), pos)
            if not chunk:
                raise UserInputError(f"{label}: its external data file is shorter than announced", str(path))
            chunks.append(chunk)
            pos += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def attach_external_data(model, path) -> bool:
    """Read every tensor stored outside the model (``data_location = EXTERNAL``) from the model's own
    folder (``path``'s, whatever the working directory) into the tensor itself; True when any was.
    All locations are validated, and the total checked against the memory and protobuf limits,
    before any byte is read.

    Warnings
    --------
    Refuses (exit 2, naming the tensor): no location; an absolute location, one with ``..``, one
    that leads out of the folder through a symbolic link (file or directory), a missing or
    non-regular file (:func:`lipverify.limits.resolve_inside`); offsets or lengths that are not
    decimal integers, a length that does not match the tensor's shape and type, bytes past the end
    of the file; string tensors; a total over the memory limit or protobuf's 2 GiB.
    """
    import onnx

    folder = Path(path).absolute().parent
    plan = []
    total = 0
    for label, t in _tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or "\x00" in loc:
            raise UserInputError(f"{label} is stored outside the model but names no valid file", str(path))
        target = resolve_inside(folder, loc, f"the external data of {label} at", path)
        bits = itemsize_bits(t.data_type)
        if bits is None:
            raise UserInputError(f"{label}: {type_name(t.data_type)} tensors stored outside the model are not "
                                 "supported", str(path))
        expected = packed_nbytes(_numel(label, t, path), bits)
        offset = _nonneg_int(info.get("offset", "0"), "offset", label, path)
        length = _nonneg_int(info["length"], "length", label, path) if "length" in info else expected
        if length != expected:
            raise UserInputError(f"{label}: external data length {length} does not match its shape and type "
                                 f"({expected} bytes)", str(path))
        size = os.stat(target).st_size
        if offset + length > size:
            raise UserInputError(f"{label}: external data bytes {offset}..{offset + length} lie past the end of "
                                 f"{loc!r} ({size} bytes)", str(path))
        total += length
        plan.append((label, t, target, offset, length))
    if not plan:
        return False
    check_alloc(2 * total, "the model's external data (read, then converted)", path)
    if total + model.ByteSize() > PROTOBUF_LIMIT:
        raise UserInputError(f"the model with its external data would be {fmt_bytes(total + model.ByteSize())}, "
                             "over protobuf's 2 GiB limit; lipverify reads models that fit in one protobuf",
                             str(path))
    for label, t, target, offset, length in plan:
        t.raw_data = _read_range(target, offset, length, label, path)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return True


# -- 4. tensor data -------------------------------------------------------------------------------
def _typed_count(t, numel: int) -> tuple[int, int] | None:
    """(values in the typed field that holds ``t``'s data, values its shape needs); None for packed
    sub-byte types."""
    dt = t.data_type
    if dt in _SUB_BYTE_BITS:
        return None
    fields = {1: ("float_data", 1), 14: ("float_data", 2), 11: ("double_data", 1), 15: ("double_data", 2),
              7: ("int64_data", 1), 12: ("uint64_data", 1), 13: ("uint64_data", 1), 8: ("string_data", 1)}
    field, per = fields.get(dt, ("int32_data", 1))
    return len(getattr(t, field)), numel * per


def _float_view(t):
    """The values of a floating-point tensor as a numpy array (no copy for raw float32/16/64)."""
    from onnx import numpy_helper

    if t.raw_data and t.data_type in _FLOAT_NP:
        return np.frombuffer(t.raw_data, dtype=_FLOAT_NP[t.data_type])
    return np.asarray(numpy_helper.to_array(t), dtype=np.float64 if t.data_type == 11 else np.float32)


def check_tensors(model, path) -> tuple[float, str]:
    """Every tensor's data matches its shape and type; no floating-point tensor holds NaN or an
    infinity.  Returns the largest magnitude of any floating-point tensor and its label.

    Warnings
    --------
    Refuses (exit 2, naming the tensor) negative dimensions, data of the wrong length, NaN and
    infinite values.  Finite weights can still overflow the outputs: the loader runs the model once
    and refuses non-finite outputs, naming the largest weight found here.
    """
    largest, where = 0.0, ""
    for label, t in _tensors(model):
        numel = _numel(label, t, path)
        bits = itemsize_bits(t.data_type)
        if t.raw_data:
            if bits is not None and len(t.raw_data) != packed_nbytes(numel, bits):
                raise UserInputError(f"{label} holds {len(t.raw_data)} bytes for shape {list(t.dims)} of "
                                     f"{type_name(t.data_type)} ({packed_nbytes(numel, bits)} expected)", str(path))
        else:
            counts = _typed_count(t, numel)
            if counts is not None and counts[0] != counts[1]:
                raise UserInputError(f"{label} holds {counts[0]} values for shape {list(t.dims)} of "
                                     f"{type_name(t.data_type)} ({counts[1]} expected)", str(path))
        if t.data_type not in _FLOAT_TYPES or numel == 0:
            continue
        a = _float_view(t)
        hi, lo = float(a.max()), float(a.min())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            what = "NaN" if (math.isnan(hi) or math.isnan(lo)) else "infinite values"
            raise UserInputError(f"{label} holds {what}; lipverify needs finite weights", str(path))
        if max(hi, -lo) > largest:
            largest, where = max(hi, -lo), label
    return largest, where


def weight_hint(largest: tuple[float, str] | None) -> str:
    """``(largest weight 1e+30 in tensor 'W')`` for messages about non-finite outputs."""
    if not largest or not largest[1]:
        return ""
    return f" (largest weight {largest[0]:.3g} in {largest[1]})"


# -- 5. inputs and outputs ------------------------------------------------------------------------
def check_io(model, path):
    """The model's one (non-initializer) input, float32, and its one floating-point output.

    Warnings
    --------
    Refuses (exit 2) any other number of inputs or outputs (naming them), an input that is not a
    float32 tensor (naming its element type) and an output that is not a floating-point tensor.
    """
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs[:5])
        raise UserInputError(f"the model has {len(inputs)} inputs{f' ({names})' if names else ''}; lipverify needs "
                             "exactly one", str(path))
    if len(g.output) != 1:
        names = ", ".join(o.name for o in g.output[:5])
        raise UserInputError(f"the model has {len(g.output)} outputs{f' ({names})' if names else ''}; lipverify "
                             "needs exactly one (the logits)", str(path))
    inp, out = inputs[0], g.output[0]
    if not inp.type.HasField("tensor_type"):
        raise UserInputError(f"the model's input {inp.name!r} is not a tensor; lipverify needs a float32 tensor",
                             str(path))
    et = inp.type.tensor_type.elem_type
    if et != 1:
        raise UserInputError(f"the model's input {inp.name!r} has element type {type_name(et)}; lipverify needs a "
                             "float32 input", str(path))
    if not out.type.HasField("tensor_type"):
        raise UserInputError(f"the model's output {out.name!r} is not a tensor; lipverify needs float logits",
                             str(path))
    et = out.type.tensor_type.elem_type
    if et not in (0,) + tuple(_FLOAT_TYPES):
        raise UserInputError(f"the model's output {out.name!r} has element type {type_name(et)}; lipverify needs "
                             "floating-point logits", str(path))
    return inp, out


__all__ = ["PROTOBUF_LIMIT", "attach_external_data", "check_io", "check_structure", "check_tensors", "count_nodes",
           "has_subgraph", "itemsize_bits", "packed_nbytes", "read_model", "type_name", "weight_hint"]
