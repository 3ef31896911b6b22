"""TorchScript files: what ``torch.jit.load`` runs while it reads one, and the graph whitelist every
method must pass before lipverify runs the module (tracing, ONNX export, inference).

A TorchScript archive holds source code (``code/**.py``) that ``torch.jit.load`` compiles, pickled
data (``data.pkl``, ``constants.pkl``) read by a restricted unpickler, and raw tensor storages.  No
Python runs, but TorchScript does: while the data is unpickled, the compiled ``__setstate__`` of every
module or object whose class defines one runs (and the C++ ``__setstate__`` of TorchBind classes,
``torch.classes.*``); and every method is TorchScript, whose graphs may call ATen operators that reach
outside the program (``aten::from_file`` maps, and with ``shared=True`` creates, a file; ``aten::save``
writes one; ``aten::_print`` and ``prim::Print`` print).  Checked, unless ``trust_pickle``:

* before loading (:func:`inspect_torchscript_archive`): the bytes are a zip archive (not a flatbuffer
  module, which torch loads by another path) and no record torch reads defines or names
  ``__setstate__`` or a TorchBind class;
* after loading and before anything runs (:func:`check_torchscript_graphs`): every node of every
  method (and forward hook) of every module type in the file, with the functions and methods it calls
  inlined, is on the whitelist below.

Warnings
--------
* The whitelist follows torch 2.14's operators; a new ATen operator whose schema takes only tensors,
  numbers and strings yet acts outside the program would pass unless it takes a file name, prints or
  returns nothing.
* Calls that cannot be inlined (methods of module interfaces or TorchBind objects) are refused, so a
  model that swaps submodules through an interface does not load.
"""

from __future__ import annotations

import io
import re

import torch

from lipverify.errors import UserInputError

#: type kinds an ATen operator's arguments and results may have in a TorchScript graph: tensors,
#: numbers, devices, dtypes, layouts, memory formats, strings, None, type variables and ``Any`` (generic
#: container operations), nested in lists, optionals, tuples, dicts and unions
_LEAF_KINDS = {"TensorType", "IntType", "SymIntType", "FloatType", "SymFloatType", "BoolType", "SymBoolType",
               "NumberType", "ComplexType", "DeviceObjType", "ScalarTypeType", "LayoutType", "MemoryFormatType",
               "StringType", "NoneType", "VarType", "AnyType"}
_CONTAINER_KINDS = {"ListType", "OptionalType", "TupleType", "DictType", "UnionType"}
#: ATen operators refused by name: files, output, global state (seeds, autograd, streams, plan caches)
_FILE_OPS = {"from_file", "save", "load"}
_PRINT_OPS = {"_print"}
_STATE_OPS = {"manual_seed", "seed", "initial_seed", "set_data", "record_stream", "backward", "_backward",
              "retain_grad", "get_gradients", "set_grad_enabled", "_cufft_set_plan_cache_max_size",
              "_cufft_clear_plan_cache", "_propagate_xla_data"}
#: a string argument with one of these in its name holds a file name
_FILE_ARG = re.compile(r"file|path|dir", re.I)
#: ATen operators that return nothing yet act only inside the program: shape assertions, mutations of
#: TorchScript lists and dicts, ``warn`` (a Python warning, as ``torch.nn`` code raises)
_NO_RESULT_OK = {"warn", "Delete", "_set_item", "clear", "extend", "insert", "remove", "reverse", "sort", "update",
                 "_assert_async", "_assert_scalar", "_assert_tensor_metadata", "sym_constrain_range",
                 "sym_constrain_range_for_size", "_linalg_check_errors"}
#: ``prim::`` nodes that only move data or control flow inside the graph (what ``torch.jit.script`` and
#: ``torch.jit.trace`` emit for torchvision classifiers and ``nn.TransformerEncoder``, and their kin);
#: ``prim::SetAttr`` is checked apart (only on the file's own modules)
_PRIM_OK = {"Constant", "If", "Loop", "ListConstruct", "ListUnpack", "TupleConstruct", "TupleUnpack", "TupleIndex",
            "TupleSlice", "DictConstruct", "DictIndex", "GetAttr", "NumToTensor", "dtype", "device", "layout",
            "unchecked_cast", "RaiseException", "Uninitialized", "min", "max", "abs", "requires_grad",
            "isinstance", "is_cuda", "is_cpu", "is_xpu", "is_nested", "is_mkldnn", "is_sparse", "is_sparse_csr",
            "is_quantized", "is_meta", "is_mps", "is_vulkan", "is_ipu", "is_maia", "is_xla", "is_mtia", "type",
            "data", "shape", "name", "grad", "EnumName", "EnumValue", "StringIndex", "AutogradAdd", "AutogradZero",
            "AutogradAnyNonZero", "AutogradAllZero", "AutogradAllNonZero", "tolist"}
_WHY_PRIM = {"Print": "which prints", "PythonOp": "which calls Python",
             "CallFunction": "which calls a function lipverify cannot follow (not inlined)",
             "CallMethod": "which calls a method of a module interface or TorchBind object (not inlined)",
             "CreateObject": "which builds an object lipverify does not run",
             "fork": "which runs code asynchronously", "Enter": "which enters a context manager",
             "Exit": "which exits a context manager"}
#: records of a TorchScript archive that hold tensor storages (raw bytes, never parsed)
_STORAGE = re.compile(r"(?:\.data/)?(?:data|constants)/[0-9]+\Z")
_TRUST = "refusing (pass --trust-pickle to load it anyway)"


def _refuse(path, msg: str):
    raise UserInputError(msg, str(path))


def inspect_torchscript_archive(data: bytes, path) -> None:
    """Before ``torch.jit.load``: refuse what it would run while reading ``data``.

    ``torch.jit.load`` runs, while it unpickles the module, the TorchScript ``__setstate__`` of every
    object whose class defines one and the C++ ``__setstate__`` of TorchBind objects (before any graph
    can be checked); and it reads a flatbuffer module (by its magic at byte 4) by another loader.  So
    the bytes must start as a zip archive without the flatbuffer magic, and no record that torch parses
    (everything but the tensor storages ``data/N`` and ``constants/N``), read with torch's own zip
    reader, may hold ``__setstate__`` or ``torch.classes``: a TorchScript method named ``__setstate__``
    is spelled so in its source, and a TorchBind class is named so in the pickles and the source.
    """
    if data[:4] != b"PK\x03\x04" or data[4:8] == b"PTMF":
        _refuse(path, "not a TorchScript zip archive (a flatbuffer or other format); " + _TRUST)
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = list(reader.get_all_records())
    except Exception:
        _refuse(path, "not a TorchScript archive (torch's zip reader cannot read it: truncated?)")
    for rec in records:
        if _STORAGE.match(rec):
            continue
        try:
            raw = bytes(reader.get_record(rec))
        except Exception:
            _refuse(path, f"the TorchScript archive's {rec[:100]!r} cannot be read (truncated?)")
        if b"__setstate__" in raw:
            _refuse(path, f"the TorchScript archive's {rec[:100]!r} defines or calls __setstate__, which "
                          "torch.jit.load runs while loading; " + _TRUST)
        if b"torch.classes" in raw:
            _refuse(path, f"the TorchScript archive's {rec[:100]!r} names a TorchBind class (torch.classes), "
                          "whose C++ __setstate__ runs while loading; " + _TRUST)


def _type_ok(t) -> bool:
    k = t.kind()
    if k in _CONTAINER_KINDS:
        return all(_type_ok(c) for c in t.containedTypes())
    return k in _LEAF_KINDS


_SCHEMAS: dict = {}


def _schema(node):
    text = node.schema()
    if text == "(no schema)":
        return None
    if text not in _SCHEMAS:
        try:
            _SCHEMAS[text] = torch._C.parse_schema(text)
        except Exception:
            _SCHEMAS[text] = None
    return _SCHEMAS[text]


def _aten_why(node) -> str | None:
    """None if the ATen node computes inside the program only; else why not (after "which")."""
    name = node.kind()[len("aten::"):]
    if name in _FILE_OPS:
        return "which reads or writes files"
    if name in _PRINT_OPS:
        return "which prints"
    if name in _STATE_OPS:
        return "which changes state outside the model (seeds, autograd, streams)"
    schema = _schema(node)
    if schema is None:
        return "which has no operator schema lipverify can check"
    inputs = list(node.inputs())
    for i, a in enumerate(schema.arguments):
        t = a.type
        while t.kind() in ("OptionalType", "ListType"):
            t = t.getElementType()
        if t.kind() == "StringType" and _FILE_ARG.search(a.name):
            return f"which takes a file name ({a.name!r}), so it reads or writes files"
        if t.kind() == "GeneratorType":
            # ``bernoulli_(p, generator=None)``: the global generator, as every random op without one
            if i < len(inputs) and inputs[i].type().kind() == "NoneType":
                continue
            return f"which takes a random-number generator ({a.name!r})"
        if not _type_ok(a.type):
            return f"which takes an argument {a.name!r} of type {a.type}"
    if not schema.returns and name not in _NO_RESULT_OK:
        return "which returns nothing (it acts outside the model)"
    for r in schema.returns:
        if not _type_ok(r.type):
            return f"which returns a {r.type}"
    return None


def _node_why(node, module_types: set) -> str | None:
    kind = node.kind()
    ns, _, name = kind.partition("::")
    if ns == "aten":
        return _aten_why(node)
    if ns == "prim":
        if name in _PRIM_OK:
            return None
        if name == "SetAttr":
            owner = node.inputsAt(0).type()
            if owner.kind() == "ClassType" and owner.qualified_name() in module_types:
                return None
            return "which changes an object that is not one of the file's modules"
        return _WHY_PRIM.get(name, "which is not a TorchScript data-flow operator lipverify runs")
    return "which is not an ATen or TorchScript data-flow operator lipverify runs"


def _short(qualified: str) -> str:
    return qualified[len("__torch__."):] if qualified.startswith("__torch__.") else qualified


def check_torchscript_graphs(module, path) -> None:
    """After ``torch.jit.load``, before the module ever runs: refuse (exit 2, one line naming the file and
    the operator) unless every node of every graph is whitelisted.

    The graphs: every method (``_method_names``, ``forward`` among them) and every forward (pre-)hook of
    every module type in the file, each inlined (``inlined_graph``: the functions and methods it calls,
    ``prim::CallFunction`` / ``prim::CallMethod``, are spliced in, recursively), walked into the blocks
    of ``prim::If`` / ``prim::Loop``.  The whitelist:

    * ``aten::`` operators whose matched schema takes and returns only tensors, numbers, bools,
      devices, dtypes, layouts, memory formats, strings, None and type variables (also in lists,
      optionals, tuples, dicts, unions), no string argument named like a file (``filename``), a
      random-number generator only where None is passed, and that return something (or only assert,
      warn, or mutate a TorchScript list or dict); never ``from_file``, ``save``, ``_print``, or the
      operators that change global state (``manual_seed``, ``set_grad_enabled``, ``record_stream``...);
    * ``prim::`` data flow (:data:`_PRIM_OK`: constants, lists, tuples, dicts, ``If``, ``Loop``,
      attribute reads, casts, ``RaiseException``...), and ``prim::SetAttr`` on the file's own modules;
    * nothing else: ``prim::Print``, Python ops, calls that could not be inlined, other namespaces.
    """
    subs = list(module.named_modules())
    module_types = {m._c._type().qualified_name() for _, m in subs}
    seen: set = set()
    for _, m in subs:
        tname = m._c._type().qualified_name()
        if tname in seen:  # one class type, the same methods
            continue
        seen.add(tname)
        graphs = [(name, lambda n=name, c=m._c: c._get_method(n).inlined_graph) for name in m._c._method_names()]
        hooks = list(m._c._get_forward_pre_hooks()) + list(m._c._get_forward_hooks())
        graphs += [(f"hook {h.name}", lambda h=h: h.inlined_graph) for h in hooks]
        for where, get in graphs:
            try:
                graph = get()
            except Exception as exc:
                text = str(exc).strip()
                why = text.splitlines()[0][:200] if text else type(exc).__name__
                _refuse(path, f"TorchScript method {_short(tname)}.{where} cannot be inlined for checking ({why}); "
                              + _TRUST)
            stack = [graph]  # the graph, then the blocks of its prim::If / prim::Loop nodes
            while stack:
                for node in stack.pop().nodes():
                    why = _node_why(node, module_types)
                    if why is not None:
                        _refuse(path, f"TorchScript graph calls {node.kind()} (in {_short(tname)}.{where}), "
                                      f"{why}; " + _TRUST)
                    stack.extend(node.blocks())
