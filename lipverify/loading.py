"""Load a classifier from a file (ONNX, TorchScript, torch.export ``.pt2``, state dict + ``--arch``) or
an ``nn.Module``, and turn it into a :class:`~lipverify.model.LipModel`.

Rules:
* ONNX goes through onnx2torch (the module comes back in training mode: ``.eval()`` is called), then
  through the fidelity check against onnxruntime.
* State dicts are read with ``torch.load(..., weights_only=True)``.  A pickled module can run code
  when unpickled, so it is refused unless the user passes ``trust_pickle=True``.
* TorchScript and ``.pt2`` programs are exported to ONNX in memory (legacy exporter, opset 17) and
  re-imported, so that every model is analysed as an fx graph of known ops.
* ``mean``/``std`` describe a normalisation applied *outside* the model: lipverify folds it in front
  of the graph and works in the user's pixel space (``1/std`` becomes part of every bound).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from lipverify.errors import FidelityError, UnsupportedOpError, UserInputError
from lipverify.fidelity import DEFAULT_TOLERANCE, Fidelity, onnx_fidelity

BUILTIN_DEFAULT = "builtin:default"


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (axis 0 of the per-example shape)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


class PixelSpaceModel(nn.Module):
    """The user's model with its outside normalisation in front: a function of raw pixels."""

    def __init__(self, model: nn.Module, normalize: Normalize | None):
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, x):
        if self.normalize is not None:
            x = self.normalize(x)
        return self.model(x)


class _Unregistered(nn.Module):
    """Wraps a module that refuses ``train()``/``eval()`` (a ``torch.export`` program) for tracing."""

    def __init__(self, inner):
        super().__init__()
        for prm in inner.parameters():
            prm.requires_grad_(False)
        object.__setattr__(self, "_inner", inner)

    def forward(self, x):
        return self._inner(x)


def parse_floats(text: str | Sequence[float] | None, what: str) -> list[float] | None:
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return [float(v) for v in text]
    try:
        return [float(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError:
        raise UserInputError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_shape(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        dims = [int(v) for v in text]
    else:
        try:
            dims = [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise UserInputError(f"--input-shape must be comma-separated integers, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise UserInputError(f"--input-shape must be positive integers, got {text!r}")
    return tuple(dims)


def _normalizer(mean, std, input_shape) -> Normalize | None:
    mean = parse_floats(mean, "--mean")
    std = parse_floats(std, "--std")
    if mean is None and std is None:
        return None
    c = input_shape[0] if len(input_shape) > 1 else 1
    mean = mean or [0.0]
    std = std or [1.0]
    for vals, what in ((mean, "--mean"), (std, "--std")):
        if len(vals) not in (1, c):
            raise UserInputError(f"{what} has {len(vals)} values but the input has {c} channels")
    if any(s <= 0 for s in std):
        raise UserInputError("--std values must be positive")
    view = (-1,) + (1,) * (len(input_shape) - 1) if len(input_shape) > 1 else (-1,)
    m = torch.tensor(mean, dtype=torch.float32).view(view)
    s = torch.tensor(std, dtype=torch.float32).view(view)
    return Normalize(m, s)


# ------------------------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserInputError("no such file", str(path))
    if path.is_dir():
        raise UserInputError("is a directory, expected a model file", str(path))
    if path.stat().st_size == 0:
        raise UserInputError("the file is empty", str(path))


def _read_onnx(path: Path):
    import onnx

    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception:
        raise UserInputError("not a valid ONNX file (could not parse the protobuf; truncated or not ONNX?)",
                             str(path)) from None
    if len(model.graph.node) == 0:
        raise UserInputError("not a valid ONNX file (no graph nodes; truncated or not ONNX?)", str(path))
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise UserInputError(f"invalid ONNX model: {str(exc).splitlines()[0]}", str(path)) from None
    return model, data


def _onnx_input_shape(model, path) -> tuple[Any, ...]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserInputError(f"the model has {len(inputs)} inputs; lipverify needs exactly one", str(path))
    dims = []
    for d in inputs[0].type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
    return tuple(dims)


def _onnx_unconvertible(model) -> list[tuple[str, str]]:
    from onnx2torch.node_converters.registry import get_converter

    opset = {o.domain or "": o.version for o in model.opset_import}
    bad = []
    for i, n in enumerate(model.graph.node):
        try:
            get_converter(n.op_type, opset.get(n.domain or "", max(opset.values())), n.domain or "")
        except NotImplementedError:
            bad.append((n.op_type, n.name or f"#{i}"))
    return bad


def _convert_onnx(model, path):
    import onnx2torch

    bad = _onnx_unconvertible(model)
    if bad:
        raise UnsupportedOpError(bad, str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = onnx2torch.convert(model)
    except Exception as exc:
        raise UserInputError(f"could not convert the ONNX graph: {str(exc).splitlines()[0]}", str(path)) from None
    return gm.eval()


def _export_to_onnx(module: nn.Module, input_shape, path) -> bytes:
    buf = io.BytesIO()
    example = torch.zeros((1,) + tuple(input_shape))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:
        if "Guard failed" in str(exc) and "size()[0]" in str(exc):
            raise UserInputError("the program was exported with a fixed batch size; export it with a dynamic "
                                 "batch dimension (torch.export Dim) so lipverify can run batches",
                                 str(path) if path else None) from None
        raise UserInputError(f"could not export the model to a graph lipverify can read: "
                             f"{str(exc).splitlines()[0]}", str(path) if path else None) from None
    return buf.getvalue()


def _import_arch(spec: str) -> nn.Module:
    """``FILE.py:callable`` or ``package.module:callable`` -> the module the callable builds."""
    if ":" not in spec:
        raise UserInputError(f"--arch must be FILE_OR_MODULE:CALLABLE, got {spec!r}")
    target, attr = spec.rsplit(":", 1)
    if target.endswith(".py") or os.path.sep in target:
        p = Path(target)
        if not p.exists():
            raise UserInputError("no such file (given in --arch)", target)
        name = "lipverify_arch_" + re.sub(r"\W", "_", p.stem)
        spec_ = importlib.util.spec_from_file_location(name, p)
        mod = importlib.util.module_from_spec(spec_)
        sys.modules[name] = mod
        try:
            spec_.loader.exec_module(mod)
        except Exception as exc:
            raise UserInputError(f"importing the architecture failed: {exc}", target) from None
    else:
        try:
            mod = importlib.import_module(target)
        except Exception as exc:
            raise UserInputError(f"cannot import module {target!r} given in --arch: {exc}") from None
    fn = getattr(mod, attr, None)
    if fn is None:
        raise UserInputError(f"{target} has no attribute {attr!r} (given in --arch)")
    try:
        net = fn() if callable(fn) and not isinstance(fn, nn.Module) else fn
    except Exception as exc:
        raise UserInputError(f"calling {spec} failed: {exc}") from None
    if not isinstance(net, nn.Module):
        raise UserInputError(f"{spec} did not return a torch.nn.Module")
    return net


def _extract_state_dict(obj, path):
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if isinstance(obj, (list, tuple)) and len(obj) >= 1 and isinstance(obj[0], dict):
        obj = obj[0]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise UserInputError("does not contain a state dict (a mapping of parameter names to tensors)", str(path))


def _load_torch_file(path: Path, arch: str | None, trust_pickle: bool, input_shape):
    """Returns (module, notes, via_onnx_bytes or None)."""
    notes = []
    if path.suffix == ".pt2":
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:
            raise UserInputError(f"not a torch.export program: {str(exc).splitlines()[0]}", str(path)) from None
        return _Unregistered(ep.module()), ["torch.export program"], "pt2"
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except Exception:
            names = []
        if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
            try:
                return torch.jit.load(str(path), map_location="cpu").eval(), ["TorchScript module"], True
            except Exception as exc:
                raise UserInputError(f"could not load TorchScript: {str(exc).splitlines()[0]}", str(path)) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc)
        if "weights_only" in msg or "Unsupported global" in msg or "WeightsUnpickler" in msg:
            if not trust_pickle:
                raise UserInputError("holds a pickled Python object, which can run code when loaded; refusing. "
                                     "Pass --trust-pickle if you trust the file, or save a state_dict",
                                     str(path)) from None
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=False)
            except Exception as exc2:
                raise UserInputError(f"could not unpickle: {str(exc2).splitlines()[0]}", str(path)) from None
            if isinstance(obj, nn.Module):
                return obj.eval(), ["pickled module (loaded with --trust-pickle)"], False
        else:
            raise UserInputError("not a PyTorch file (torch.load failed: truncated or wrong format?)",
                                 str(path)) from None
    sd = _extract_state_dict(obj, path)
    if arch is None:
        raise UserInputError("is a state dict: pass --arch FILE_OR_MODULE:CALLABLE that builds the network",
                             str(path))
    net = _import_arch(arch)
    try:
        net.load_state_dict(sd, strict=True)
    except Exception as exc:
        first = str(exc).replace("\n", " ").replace("\t", " ")
        raise UserInputError(f"state dict does not fit the --arch network: {first[:300]}", str(path)) from None
    notes.append(f"state dict loaded into {arch}")
    return net.eval(), notes, False


# ------------------------------------------------------------------------------------------------


def load(source: str | os.PathLike | nn.Module = BUILTIN_DEFAULT, *, input_shape=None, mean=None, std=None,
         arch: str | None = None, trust_pickle: bool = False, fidelity_check: bool = True,
         fidelity_inputs: torch.Tensor | None = None, fidelity_tolerance: float = DEFAULT_TOLERANCE,
         device: str | torch.device = "cpu", name: str | None = None):
    """Load a classifier and build its Lipschitz graph.

    Parameters
    ----------
    source:
        path of an ``.onnx`` / TorchScript / ``.pt2`` / state-dict file, an ``nn.Module``, or
        ``"builtin:default"`` for the embedded MNIST model.
    input_shape:
        per-example input shape (no batch dimension), e.g. ``(1, 28, 28)``; read from ONNX files,
        required for torch modules.
    mean, std:
        normalisation applied outside the model (comma-separated per channel or a single value).
    arch:
        ``FILE.py:callable`` or ``module:callable`` building the network for a state dict.
    trust_pickle:
        allow unpickling a whole module (it can run code).
    fidelity_check:
        compare the converted ONNX model with onnxruntime and refuse above tolerance.

    Returns
    -------
    :class:`lipverify.model.LipModel`
    """
    from lipverify.importer import build_graph, strip_to_logits, trace_module
    from lipverify.model import LipModel
    from lipverify.simplify import simplify

    shape = parse_shape(input_shape)
    notes: list[str] = []
    fidelity: Fidelity | None = None
    onnx_bytes = None
    path_str = None
    if isinstance(source, nn.Module):
        module = source.eval()
        label = name or type(source).__name__
        needs_onnx = False
    elif str(source) == BUILTIN_DEFAULT:
        from lipverify.models.zoo import DEFAULT_INPUT_SHAPE, default_model

        module = default_model()
        label = BUILTIN_DEFAULT
        shape = shape or tuple(DEFAULT_INPUT_SHAPE)
        needs_onnx = False
        notes.append("embedded default model: 2C2F MNIST classifier shipped with lipverify")
    else:
        path = Path(source)
        path_str = str(path)
        label = name or path_str
        _check_file(path)
        if path.suffix.lower() == ".onnx":
            model, onnx_bytes = _read_onnx(path)
            declared = _onnx_input_shape(model, path)
            per_example = declared[1:]
            if shape is None:
                if any(d is None for d in per_example) or not per_example:
                    raise UserInputError("the ONNX input has symbolic dimensions: pass --input-shape", path_str)
                shape = tuple(per_example)
            elif all(d is not None for d in per_example) and tuple(per_example) != shape:
                raise UserInputError(f"--input-shape {','.join(map(str, shape))} does not match the model's "
                                     f"input shape {','.join(map(str, per_example))}", path_str)
            module = _convert_onnx(model, path)
            needs_onnx = False
            if fidelity_check:
                batch_shape = (declared[0] if declared[0] is not None else None,) + tuple(shape)
                fidelity = onnx_fidelity(onnx_bytes, module, batch_shape, shape, fidelity_inputs,
                                         tolerance=fidelity_tolerance)
                if not fidelity.passed:
                    raise FidelityError(
                        f"the converted model differs from onnxruntime by {fidelity.max_abs_diff:.3g} "
                        f"(relative {fidelity.max_rel_diff:.3g} > {fidelity_tolerance:g}) on input "
                        f"#{fidelity.worst_input}; pass --no-fidelity-check to analyse it anyway", path_str)
            else:
                notes.append("fidelity check skipped (--no-fidelity-check)")
        else:
            module, more, needs_onnx = _load_torch_file(path, arch, trust_pickle, shape)
            notes.extend(more)
    if shape is None:
        raise UserInputError("pass --input-shape (e.g. 1,28,28) for a PyTorch model", path_str)

    gm = None
    if needs_onnx == "pt2":
        from lipverify.importer import normalise_aten

        gm = module._inner
        normalise_aten(gm)
        needs_onnx = False
    elif not needs_onnx:
        try:
            gm = trace_module(module)
        except Exception as exc:
            notes.append(f"torch.fx could not trace the module ({type(exc).__name__}); analysed via ONNX export")
            needs_onnx = True
    if needs_onnx:
        data = _export_to_onnx(module, shape, path_str)
        import onnx

        gm = _convert_onnx(onnx.load_from_string(data), path_str or label)
        module = gm
    normalizer = _normalizer(mean, std, shape)
    if not isinstance(module, _Unregistered):
        gm = gm.eval()
    graph = build_graph(gm, shape, path_str or label)
    gm = strip_to_logits(gm, graph.logits_fx_node)
    if normalizer is not None:
        graph = _prepend_normalizer(graph, normalizer, shape)
        notes.append("normalisation outside the model folded in: inputs and radii are in pixel space")
    graph = simplify(graph)
    pixel_module = PixelSpaceModel(_Unregistered(gm) if isinstance(module, _Unregistered) else gm, normalizer)
    lm = LipModel(pixel_module, graph, shape, label, fidelity=fidelity, notes=notes + graph.notes)
    lm.check_graph()
    return lm.to(device)


def _prepend_normalizer(graph, normalizer: Normalize, shape):
    from lipverify.graph import LipschitzGraph, Node
    from lipverify.linear_ops import Scale

    inv = 1.0 / normalizer.std
    op = Scale(inv.expand(shape).clone(), shape, (-normalizer.mean * inv).expand(shape).clone())
    nodes = [graph.nodes[0], Node("normalize", "linear", [0], tuple(shape), op, ["normalize"])]
    for n in graph.nodes[1:]:
        n.inputs = [j + 1 if j > 0 else 1 for j in n.inputs]
        nodes.append(n)
    return LipschitzGraph(nodes, graph.output + 1, graph.notes)
