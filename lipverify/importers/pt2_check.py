"""``torch.export`` (``.pt2``) archives inspected before ``torch.export.load`` reads them.

``torch.export.load`` can run code while it reads an archive: it unpickles parts of it with
``weights_only=False``, ``eval``s its symbolic-size expressions (``sympy.sympify``), compiles its
guards, resolves node targets to any callable reachable from ``torch`` and splices names into generated
source. :func:`inspect_pt2` checks the archive's bytes against a whitelist (the table below says what
each check closes) and :func:`check_program_ops` checks the loaded graph's operators again, so that
only ATen operators without effects outside the program ever run.

Warnings
--------
* The whitelist follows torch 2.14's archive format and operator schemas; a newer format is refused
  rather than guessed at.
* :func:`lipverify.importers.torchfile.load_pt2` skips both checks with ``--trust-pickle``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import keyword
import logging
import math
import operator
import re
import warnings
import zipfile

import torch
import torch.nn as nn

from lipverify.errors import UserInputError


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def quiet_torch():
    """Silence the loggers and warnings of torch's (de)serialisers while a file is loaded: a damaged file
    must give lipverify's one-line error, not torch's logged traceback (``torch.export.load`` logs one at
    WARNING level before it falls back to an older format)."""
    names = ("torch.export", "torch._export", "torch.export.pt2_archive._package", "torch._export.serde.serialize",
             "torch.serialization", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, was in zip(loggers, saved):
            lg.disabled = was


#: keyword arguments a sympy ``srepr`` text may pass (the assumptions, ``Float``'s precision)
_ASSUMPTIONS = {"algebraic", "antihermitian", "commutative", "complex", "composite", "even", "extended_negative",
                "extended_nonnegative", "extended_nonpositive", "extended_nonzero", "extended_positive",
                "extended_real", "finite", "hermitian", "imaginary", "infinite", "integer", "irrational", "negative",
                "noninteger", "nonnegative", "nonpositive", "nonzero", "odd", "polar", "positive", "prime",
                "rational", "real", "transcendental", "zero", "precision", "evaluate"}


# -- torch.export (.pt2) archives -----------------------------------------------------------------------
#
# What ``torch.export.load`` (torch 2.14) runs while it reads an archive, and how each is closed here
# (``inspect_pt2`` refuses the archive before torch sees it unless ``--trust-pickle``):
#
# * ``data/weights/*`` with ``"use_pickle": true`` and ``data/constants/tensor_*`` with it:
#   ``torch.load(weights_only=False)``                                  -> use_pickle must be false
# * ``data/constants/custom_obj_*``: ``torch._C._pickle_load_obj`` (TorchBind objects) and
#   ``data/constants/opaque_obj_*``: ``pickle.loads``                    -> only ``tensor_*`` constants
# * legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` and the pre-2.7 archive layout
#   (``serialized_*.pt``): ``torch.load(weights_only=True)`` falling back to ``weights_only=False``
#                                                                       -> refused by name (whitelist)
# * ``data/sample_inputs/<model>.pt``: the same fallback              -> must load with weights_only=True
#   (the same call torch makes first, on the same bytes: then the fallback is never reached)
# * ``data/aotinductor/*``: compiled shared libraries, loaded with dlopen -> refused by name
# * ``models/<model>.json``: ``sympy.sympify`` (``eval``) of every ``expr_str``; ``exec`` of
#   ``guards_code`` by ``ExportedProgram.module()``; node targets resolved by ``getattr`` from ``torch``,
#   ``math`` and ``operator`` (torch's verifier keeps operators only, but ``aten::from_file`` creates a
#   file and ``aten::_print`` prints when lipverify traces the graph); parameter and node names spliced
#   into the generated ``forward`` source (``getattr(self.f, "<name>")``); ``importlib`` imports named
#   in tree specs                                                        -> the JSON checks below
#
# The archive is read once into memory, and both the checks and ``torch.export.load`` read those bytes
# (``torch._C.PyTorchFileReader``, the reader torch uses), so the file cannot change in between.

_ARCHIVE_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_MODEL = "model"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FQN_PART = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)\Z")
_WEIGHT_FILE = re.compile(r"weight_[0-9]+\Z")
_CONST_FILE = re.compile(r"tensor_[0-9]+\Z")
_EXTRA_FILE = re.compile(r"extra/[A-Za-z0-9_.\-]+\Z")
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z][A-Za-z0-9_]*)\Z")
#: non-ATen call targets a program may hold: tuple indexing and the arithmetic of symbolic sizes
_SYM_TARGETS = {**{f"_operator.{n}": getattr(operator, n) for n in (
    "getitem", "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv", "mod", "truediv",
    "and_", "or_")}, "math.trunc": math.trunc, **{f"torch.{n}": getattr(torch, n) for n in (
        "sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt")}}
#: base types an ATen operator's arguments and results may have (its effects stay inside tensors)
_OK_KINDS = {"TensorType", "IntType", "SymIntType", "FloatType", "SymFloatType", "BoolType", "SymBoolType",
             "NumberType", "ComplexType", "DeviceObjType", "GeneratorType", "ScalarTypeType", "LayoutType",
             "MemoryFormatType"}
#: string arguments that only select a mode (``gelu(approximate="tanh")``); a file name, a message or a
#: string to print is none of these, so ``aten::save``, ``from_file``, ``_print`` and ``warn`` are refused
_MODE_STRINGS = {"approximate", "rounding_mode", "reduce", "mode", "padding", "equation", "indexing", "interpolation",
                 "side", "norm", "ord", "driver", "UPLO", "pad_mode", "padding_side", "assert_msg"}
#: ATen operators that return nothing yet have no effect outside the program (shape assertions)
_NO_RESULT_OK = {"_assert_scalar", "_assert_tensor_metadata", "_assert_async", "sym_constrain_range",
                 "sym_constrain_range_for_size"}
#: the dtypes a weight may have (``torch._export.serde.schema.ScalarType`` numbers)
_DTYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
           7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16}
#: what a symbolic-size expression (``srepr`` text, given to ``sympy.sympify``) may call
_SYM_FUNCS = {"Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs", "floor",
              "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "LessThan", "StrictGreaterThan",
              "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair",
              "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
              "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
              "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity"}
_SYM_NAMES = {"oo", "zoo", "nan", "true", "false", "int_oo"}
_POW_FUNCS = {"Pow", "PowByNatural", "FloatPow"}
_GUARD_ATTRS = {"size", "stride", "storage_offset", "dim", "shape"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_EXCEPT_NL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _refuse(path, msg: str):
    raise UserInputError(msg, str(path))


def _no_control(s: str, where: str, path, newline_ok: bool = False) -> None:
    """Strings of the program end up in generated Python source (names) and in its comments (stack
    traces, annotations): a carriage return or other control character there ends the comment."""
    m = (_CONTROL_EXCEPT_NL if newline_ok else _CONTROL).search(s)
    if m:
        _refuse(path, f"the program's {where} holds the control character {m.group()!r}; refusing the file")


def _aten_op_allowed(op) -> str | None:
    """None if ``op`` (an ATen ``OpOverload``) computes on tensors and numbers only; else why not.

    Whitelisted by schema: every argument and result is a tensor, a number, a bool, a device, a dtype,
    a generator, or a list / optional of these; a string only where it selects a mode
    (:data:`_MODE_STRINGS`); and the operator returns something (or is a shape assertion).  This
    excludes every ATen operator that reaches outside the program: ``save`` and ``from_file`` (files),
    ``_print`` and ``warn`` (output), ``manual_seed`` and ``set_grad_enabled`` (global state),
    ``_set_item`` (Python containers), ``record_stream`` (streams).
    """
    schema = op._schema

    def base(t):
        while t.kind() in ("OptionalType", "ListType"):
            t = t.getElementType()
        return t.kind()

    for a in schema.arguments:
        k = base(a.type)
        if k == "StringType":
            if a.name not in _MODE_STRINGS:
                return f"takes a string argument {a.name!r}"
        elif k not in _OK_KINDS:
            return f"takes an argument {a.name!r} of type {a.type}"
    if not schema.returns and op._schema.name.split("::")[-1] not in _NO_RESULT_OK:
        return "returns nothing (it acts outside the program)"
    for r in schema.returns:
        if base(r.type) not in _OK_KINDS:
            return f"returns a {r.type}"
    return None


def _resolve_target(target: str):
    """The callable a serialised node target names, if it is on the whitelist; else (None, why)."""
    if target in _SYM_TARGETS:
        return _SYM_TARGETS[target], None
    m = _ATEN_TARGET.match(target)
    if not m:
        return None, "is not an ATen operator (only ATen operators and symbolic-size arithmetic are loaded)"
    name, overload = m.groups()
    try:
        packet = getattr(torch.ops.aten, name)
        if overload not in packet.overloads():
            return None, "is not a known ATen operator"
        op = getattr(packet, overload)
    except Exception:
        return None, "is not a known ATen operator"
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
        return None, "is not an ATen operator"
    why = _aten_op_allowed(op)
    return (op, None) if why is None else (None, why)


def _check_sym_expr(text: str, path) -> None:
    """``expr_str`` is handed to ``sympy.sympify``, which ``eval``s it: it must be ``srepr`` text that
    only calls the sympy constructors of :data:`_SYM_FUNCS` on literal arguments (no attribute, no
    subscript, no operator, no other name), with exponents of at most 64."""
    if len(text) > 10_000:
        _refuse(path, "the program holds a symbolic-size expression longer than 10000 characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        _refuse(path, f"the program holds a symbolic-size expression that is not sympy srepr text: {text[:80]!r}")

    def lit_int(n):
        if isinstance(n, ast.Constant) and type(n.value) is int:
            return n.value
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            v = lit_int(n.operand)
            return None if v is None else -v
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Integer" and len(n.args) == 1:
            return lit_int(n.args[0])
        return None

    def ok(n, depth=0) -> bool:
        if depth > 100:
            return False
        if isinstance(n, ast.Constant):
            v = n.value
            if type(v) is int:
                return abs(v) <= 1 << 63
            if type(v) in (bool, float) or v is None:
                return True
            return type(v) is str and re.fullmatch(r"[A-Za-z0-9_.+\-]{1,64}", v) is not None
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return ok(n.operand, depth + 1)
        if isinstance(n, ast.Name):
            return n.id in _SYM_NAMES
        if isinstance(n, ast.Call):
            if not (isinstance(n.func, ast.Name) and n.func.id in _SYM_FUNCS):
                return False
            if n.func.id in _POW_FUNCS and len(n.args) == 2:
                e = lit_int(n.args[1])
                if e is not None and abs(e) > 64:
                    return False
            for kw in n.keywords:
                if kw.arg is None or kw.arg not in _ASSUMPTIONS or not (
                        isinstance(kw.value, ast.Constant) and type(kw.value.value) in (bool, int)):
                    return False
            return all(ok(a, depth + 1) for a in n.args)
        return False

    if not ok(tree.body):
        _refuse(path, f"the program holds a symbolic-size expression lipverify does not accept (only sympy "
                      f"constructors of literals are evaluated): {text[:80]!r}")


def _check_guard(text: str, path) -> None:
    """A guard is compiled into Python by ``ExportedProgram.module()``: only comparisons of input sizes
    (``L['x'].size()[0] >= 2``) and integer arithmetic are accepted (lipverify also builds the module
    with ``check_guards=False``, so guards are never compiled)."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        _refuse(path, f"the program holds a guard that is not an expression: {text[:80]!r}")
    allowed_ops = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or, ast.Not, ast.USub,
                   ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)

    def ok(n) -> bool:
        if isinstance(n, ast.Constant):
            return type(n.value) in (int, float, bool, str)
        if isinstance(n, ast.Name):
            return n.id == "L"
        if isinstance(n, ast.Compare):
            return ok(n.left) and all(isinstance(o, allowed_ops) for o in n.ops) and all(map(ok, n.comparators))
        if isinstance(n, ast.BoolOp):
            return isinstance(n.op, allowed_ops) and all(map(ok, n.values))
        if isinstance(n, ast.UnaryOp):
            return isinstance(n.op, allowed_ops) and ok(n.operand)
        if isinstance(n, ast.BinOp):
            return isinstance(n.op, allowed_ops) and ok(n.left) and ok(n.right)
        if isinstance(n, ast.Subscript):
            return ok(n.value) and isinstance(n.slice, ast.Constant) and type(n.slice.value) in (int, str)
        if isinstance(n, ast.Attribute):
            return n.attr in _GUARD_ATTRS and ok(n.value)
        if isinstance(n, ast.Call):
            return (isinstance(n.func, ast.Attribute) and n.func.attr in _GUARD_ATTRS and ok(n.func.value)
                    and not n.keywords and all(isinstance(a, ast.Constant) and type(a.value) is int for a in n.args))
        return False

    if not ok(tree.body):
        _refuse(path, f"the program holds a guard lipverify does not accept (only comparisons of input sizes): "
                      f"{text[:80]!r}")


def _check_treespec(text: str, path) -> None:
    """Tree specs are decoded by ``torch.utils._pytree.treespec_loads``, which imports the module a
    ``defaultdict`` or enum context names: only tuples, lists, dicts and leaves are accepted."""
    try:
        doc = json.loads(text)
    except Exception:
        _refuse(path, "the program's input/output specification is not JSON")

    def ok(spec, depth=0) -> bool:
        if depth > 50 or not isinstance(spec, dict) or set(spec) != {"type", "context", "children_spec"}:
            return False
        typ, ctx, children = spec["type"], spec["context"], spec["children_spec"]
        if not isinstance(children, list):
            return False
        if typ is None:
            return ctx is None and not children
        if typ in ("builtins.tuple", "builtins.list"):
            if ctx != "null":
                return False
        elif typ in ("builtins.dict", "collections.OrderedDict"):
            try:
                keys = json.loads(ctx)
            except Exception:
                return False
            if not (isinstance(keys, list) and all(type(k) in (str, int) for k in keys)):
                return False
        else:
            return False
        return all(ok(c, depth + 1) for c in children)

    if not (isinstance(doc, list) and len(doc) == 2 and type(doc[0]) is int and ok(doc[1])):
        _refuse(path, "the program's input/output specification names types other than tuples, lists and "
                      "dicts; refusing (decoding it could import modules)")


def _check_fqn(name, what: str, path) -> None:
    """Parameter, buffer and constant names become attribute paths in generated Python source."""
    if not isinstance(name, str) or not name or not all(_FQN_PART.match(p) for p in name.split(".")):
        _refuse(path, f"the program's {what} {str(name)[:80]!r} is not a dotted Python name")
    if any(keyword.iskeyword(p) for p in name.split(".")):
        _refuse(path, f"the program's {what} {name[:80]!r} uses a Python keyword")


def _check_ident(name, what: str, path, keyword_ok: bool = False) -> None:
    """Node, value and argument names are spliced into generated Python source."""
    if not isinstance(name, str) or not _IDENT.match(name) or (keyword.iskeyword(name) and not keyword_ok):
        _refuse(path, f"the program's {what} {str(name)[:80]!r} is not a Python identifier")


_NAME_MAPS = ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values")
_REFUSED_KEYS = {"as_custom_obj": "a custom (TorchBind) object", "as_custom_objs": "custom (TorchBind) objects",
                 "custom_obj": "a custom (TorchBind) object", "as_operator": "an operator passed as a value",
                 "as_graph": "a subgraph (control flow or a higher-order operator)"}


def _check_program_json(doc, path) -> None:
    """Every string of ``models/model.json`` that torch evaluates, imports, resolves or splices into
    source is checked against a whitelist (see the comment above :data:`_ARCHIVE_FIXED`)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        _refuse(path, "models/model.json is not a torch.export program")
    gm = doc["graph_module"]
    graph = gm.get("graph") or {}
    if graph.get("custom_obj_values"):
        _refuse(path, "the program holds custom (TorchBind) objects, which are unpickled when loaded; refusing "
                      "(pass --trust-pickle if you trust the file)")
    guards = doc.get("guards_code") or []
    if not isinstance(guards, list):
        _refuse(path, "the program's guards are not a list")
    for g in guards:
        if not isinstance(g, str):
            _refuse(path, "the program holds a guard that is not a string")
        _check_guard(g, path)

    def walk(o, key, depth):
        if depth > 200:
            _refuse(path, "the program is nested more than 200 levels deep")
        if isinstance(o, dict):
            if key in _NAME_MAPS:
                for k in o:
                    _check_ident(k, "value name", path)
            if isinstance(o.get("target"), str) and "inputs" in o and "outputs" in o:
                fn, why = _resolve_target(o["target"])
                if fn is None:
                    _refuse(path, f"the program calls {o['target'][:100]!r}, which {why}; refusing the file")
            schema_arg = "arg" in o and "kind" in o  # {"name": <schema argument>, "arg": ..., "kind": ...}
            for k, v in o.items():
                if not isinstance(k, str):
                    _refuse(path, "the program has a non-string key")
                _no_control(k, "key", path)
                if k in _REFUSED_KEYS and v is not None:
                    _refuse(path, f"the program holds {_REFUSED_KEYS[k]}, which lipverify does not load")
                if k in ("name", "as_name") and isinstance(v, str):
                    # a schema's argument names may be keywords (aten::random_.from's ``from``): they are
                    # passed as keyword arguments by name, never written as Python names
                    _check_ident(v, "name", path, keyword_ok=schema_arg and k == "name")
                elif k in ("parameter_name", "buffer_name", "tensor_constant_name"):
                    _check_fqn(v, k.replace("_", " "), path)
                elif k == "fqn" and v != "":
                    _check_fqn(v, "module name", path)
                elif k == "forward_arg_names" and isinstance(v, list):
                    for a in v:
                        _check_ident(a, "argument name", path)
                elif k == "expr_str":
                    if not isinstance(v, str):
                        _refuse(path, "the program holds a symbolic-size expression that is not a string")
                    _check_sym_expr(v, path)
                elif k in ("in_spec", "out_spec") and v is not None:
                    if not isinstance(v, str):
                        _refuse(path, "the program's input/output specification is not a string")
                    _check_treespec(v, path)
                walk(v, k, depth + 1)
        elif isinstance(o, list):
            for v in o:
                walk(v, key, depth + 1)
        elif isinstance(o, str):
            _no_control(o, "text", path, newline_ok=(key == "stack_trace"))
            if o[:1] in ("{", "[") and key != "stack_trace":
                try:
                    inner = json.loads(o)
                except Exception:
                    return
                walk(inner, key + "/json", depth + 1)

    walk(doc, "", 0)


def _check_payload_config(reader, config_name: str, folder: str, file_re, records: set, path) -> None:
    """A weights or constants config: every entry a raw tensor (``use_pickle`` false) in a file of this
    archive whose bytes hold the view it describes."""
    try:
        cfg = json.loads(reader.get_record(config_name))
    except Exception:
        _refuse(path, f"{config_name} in the archive is not JSON")
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        _refuse(path, f"{config_name} in the archive is not a payload config")
    for fqn, meta in entries.items():
        _check_fqn(fqn, "weight name", path)
        if not isinstance(meta, dict):
            _refuse(path, f"{config_name}: the entry of {fqn!r} is not an object")
        if meta.get("use_pickle") is not False:
            _refuse(path, f"the archive stores {fqn!r} as a pickle (use_pickle), which runs code when loaded; "
                          "refusing (pass --trust-pickle if you trust the file)")
        name = meta.get("path_name")
        if not isinstance(name, str) or not file_re.match(name):
            kind = ("a custom object or opaque Python object (unpickled when loaded)"
                    if isinstance(name, str) and name.startswith(("custom_obj_", "opaque_obj_")) else "an unknown kind")
            _refuse(path, f"the archive's entry {fqn!r} is {kind}; only raw tensors are loaded "
                          "(pass --trust-pickle if you trust the file)")
        rec = folder + name
        if rec not in records:
            _refuse(path, f"the archive lacks {rec}, the data of {fqn!r}")
        tm = meta.get("tensor_meta")
        try:
            dtype = _DTYPES[tm["dtype"]]
            sizes = [int(s["as_int"]) for s in tm["sizes"]]
            strides = [int(s["as_int"]) for s in tm["strides"]]
            offset = int(tm["storage_offset"]["as_int"])
        except Exception:
            _refuse(path, f"the archive describes {fqn!r} with a dtype or symbolic/missing sizes lipverify does "
                          "not read")
        if len(sizes) != len(strides) or any(s < 0 for s in sizes) or any(s < 0 for s in strides) or offset < 0:
            _refuse(path, f"the archive describes {fqn!r} with negative or mismatched sizes")
        extent = 0 if 0 in sizes else offset + 1 + sum((n - 1) * s for n, s in zip(sizes, strides))
        have = reader.get_record_size(rec) // torch.empty((), dtype=dtype).element_size()
        if extent > have:
            _refuse(path, f"the archive's {rec} holds {have} elements, fewer than the {extent} {fqn!r} reads")


def inspect_pt2(data: bytes, path) -> None:
    """Refuse (exit 2) a ``.pt2`` archive unless everything ``torch.export.load`` would read from it is
    plain data; see the comment above :data:`_ARCHIVE_FIXED` for what torch runs and how each is closed.

    Whitelisted: the archive's bookkeeping files; ``models/model.json`` (checked by
    :func:`_check_program_json`: node targets are ATen operators without outside effects or symbolic
    arithmetic, symbolic expressions are sympy constructors of literals, guards compare input sizes,
    names are identifiers, tree specs hold tuples, lists and dicts); raw weights and tensor constants
    described by their configs with ``use_pickle`` false; sample inputs that load with
    ``weights_only=True``; ``extra/`` text files.  Anything else (AOTInductor libraries, custom or opaque
    objects, legacy or pickled payloads, other models) is refused by name.

    Warnings
    --------
    * The whitelist follows torch 2.14's reader; a later torch that reads new parts of the archive reads
      nothing lipverify lets through unchecked only as long as those parts have new names.
    * The sample inputs are unpickled (weights-only) to check them.
    """
    buf = io.BytesIO(data)
    try:
        with zipfile.ZipFile(buf) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        _refuse(path, "not a torch.export program: not a zip archive (truncated or another format?)")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        _refuse(path, "the archive lists the same file twice; refusing (two readers could read different copies)")
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        _refuse(path, "not a torch.export archive (its files are not all in one folder)")
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED or i.flag_bits & 0x1:
            _refuse(path, f"the archive's {i.filename} is compressed or encrypted; torch.export writes stored files")
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = list(reader.get_all_records())
    except Exception as exc:
        _refuse(path, f"not a torch.export program ({first_line(exc)})")
    record_set = set(records)
    if len(record_set) != len(records) or len(records) != len(names):
        _refuse(path, "the archive's directory does not read the same with torch's reader; refusing")
    try:
        fmt = bytes(reader.get_record("archive_format")).decode()
        ver = bytes(reader.get_record("archive_version")).decode()
    except Exception:
        _refuse(path, "not a torch.export program (no archive_format / archive_version)")
    if fmt != "pt2" or ver != "0":
        _refuse(path, f"not a torch.export program of a format lipverify reads (format {fmt[:20]!r}, version "
                      f"{ver[:20]!r})")
    weights_cfg = f"data/weights/{_MODEL}_weights_config.json"
    consts_cfg = f"data/constants/{_MODEL}_constants_config.json"
    program = f"models/{_MODEL}.json"
    sample = f"data/sample_inputs/{_MODEL}.pt"
    for need in (program, weights_cfg, consts_cfg):
        if need not in record_set:
            _refuse(path, f"the archive has no {need} (only single-program archives written by torch.export.save "
                          "are read)")
    known = _ARCHIVE_FIXED | {program, weights_cfg, consts_cfg, sample}
    for r in records:
        if r in known or _EXTRA_FILE.match(r):
            continue
        if r.startswith("data/weights/") and _WEIGHT_FILE.match(r[len("data/weights/"):]):
            continue
        if r.startswith("data/constants/") and _CONST_FILE.match(r[len("data/constants/"):]):
            continue
        why = ("compiled code (AOTInductor), which runs when loaded" if r.startswith("data/aotinductor/") else
               "a pickled or unknown payload")
        _refuse(path, f"the archive holds {r[:100]!r}: {why}; only programs, raw weights and their configs are "
                      "loaded (pass --trust-pickle if you trust the file)")
    _check_payload_config(reader, weights_cfg, "data/weights/", _WEIGHT_FILE, record_set, path)
    _check_payload_config(reader, consts_cfg, "data/constants/", _CONST_FILE, record_set, path)
    try:
        doc = json.loads(bytes(reader.get_record(program)))
    except Exception:
        _refuse(path, f"{program} in the archive is not JSON")
    _check_program_json(doc, path)
    if sample in record_set:
        raw = bytes(reader.get_record(sample))
        if raw:
            try:
                # the very call torch.export.load makes first (deserialize_torch_artifact): when it succeeds
                # here it succeeds there, and torch never reaches its weights_only=False fallback
                with quiet_torch():
                    obj = torch.load(io.BytesIO(raw), weights_only=True)
            except Exception:
                _refuse(path, f"the archive's {sample} holds pickled Python objects beyond tensors, which run "
                              "code when loaded; refusing (pass --trust-pickle if you trust the file)")
            if not isinstance(obj, (tuple, dict)):
                _refuse(path, f"the archive's {sample} is not a tuple of example inputs")


def check_program_ops(gm: nn.Module, path) -> None:
    """After loading: every node of every graph in ``gm`` is a placeholder, an output, a ``get_attr`` or
    a call of a whitelisted target (:func:`_resolve_target`), so tracing the program runs only ATen
    operators without outside effects and size arithmetic."""
    allowed_py = set(_SYM_TARGETS.values())
    for mod_name, mod in gm.named_modules():
        graph = getattr(mod, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            t = node.target
            if node.op == "call_function":
                if isinstance(t, torch._ops.OpOverload) and t.namespace == "aten" and _aten_op_allowed(t) is None:
                    continue
                if any(t is p for p in allowed_py):
                    continue
            _refuse(path, f"the program's node {node.name} ({node.op} {str(t)[:80]}) is not an ATen operator "
                          "lipverify runs; refusing the file")
