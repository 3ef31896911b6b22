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

import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from lipverify.errors import FidelityError, UserInputError
from lipverify.importers.fidelity import DEFAULT_TOLERANCE, Fidelity, onnx_fidelity
from lipverify.importers.normalize import (
    PixelSpaceModel,
    make_normalizer,
    parse_shape,
    prepend_normalizer,
)
from lipverify.importers.onnx import (
    check_file,
    convert_onnx,
    explain_run_failure,
    export_to_onnx,
    onnx_input_shape,
    read_onnx,
)
from lipverify.importers.onnx_memory import estimate_memory
from lipverify.importers.onnx_safety import weight_hint
from lipverify.importers.torchfile import Unregistered, load_torch_file
from lipverify.limits import MAX_CLASSES, MAX_NODES, check_alloc

BUILTIN_DEFAULT = "builtin:default"


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
    from lipverify.graph.simplify import simplify
    from lipverify.importers.fx import TRACE_BATCH, build_graph, strip_to_logits, trace_module
    from lipverify.model import LipModel

    shape = parse_shape(input_shape)
    if shape is not None:
        check_input_size(shape, TRACE_BATCH + 1, None if isinstance(source, nn.Module) else str(source))
    notes: list[str] = []
    fidelity: Fidelity | None = None
    path_str = None
    onnx_file = False
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
        check_file(path)
        if path.suffix.lower() == ".onnx":
            module, shape, fidelity = _load_onnx(path, shape, fidelity_check, fidelity_inputs, fidelity_tolerance,
                                                 notes)
            needs_onnx = False
            onnx_file = True
        else:
            module, more, needs_onnx = load_torch_file(path, arch, trust_pickle, shape)
            notes.extend(more)
            hint = getattr(module, "example_shape", None)
            if shape is None and hint:
                shape = tuple(hint)
                notes.append(f"input shape {','.join(map(str, shape))} read from the program's example input")
    if shape is None:
        raise UserInputError("pass --input-shape (e.g. 1,28,28) for a PyTorch model", path_str)
    check_input_size(shape, TRACE_BATCH + 1, path_str)

    gm = None
    if needs_onnx == "pt2":
        from lipverify.importers.aten import normalise_aten

        gm = module.wrapped
        normalise_aten(gm)
        needs_onnx = False
    elif not needs_onnx:
        try:
            gm = trace_module(module)
        except Exception as exc:
            notes.append(f"torch.fx could not trace the module ({type(exc).__name__}); analysed via ONNX export")
            needs_onnx = True
    if needs_onnx:
        data = export_to_onnx(module, shape, path_str)
        import onnx

        gm = convert_onnx(onnx.load_from_string(data), path_str or label)
        module = gm
    normalizer = make_normalizer(mean, std, shape)
    if not isinstance(module, Unregistered):
        gm = gm.eval()
    if not onnx_file:  # ONNX files were checked before conversion
        calls = sum(1 for n in gm.graph.nodes if n.op.startswith("call"))
        if calls > MAX_NODES:
            raise UserInputError(f"the model has {calls:,} operations, over the limit of {MAX_NODES:,}",
                                 path_str or label)
        _check_finite_outputs(gm, shape, path_str or label, lambda: weight_hint(_largest_weight(gm)), explain=False)
    graph = build_graph(gm, shape, path_str or label)
    check_classes(graph, path_str or label)
    gm = strip_to_logits(gm, graph.logits_fx_node)
    if normalizer is not None:
        graph = prepend_normalizer(graph, normalizer, shape)
        notes.append("normalisation outside the model folded in: inputs and radii are in pixel space")
    graph = simplify(graph)
    pixel_module = PixelSpaceModel(Unregistered(gm) if isinstance(module, Unregistered) else gm, normalizer)
    lm = LipModel(pixel_module, graph, shape, label, fidelity=fidelity, notes=notes + graph.notes)
    lm.check_graph()
    return lm.to(device)


def _load_onnx(path: Path, shape, fidelity_check: bool, fidelity_inputs, tolerance: float, notes: list):
    """The converted module of an ONNX file, its per-example input shape and its fidelity report.

    Order: the file's own checks (:func:`lipverify.importers.onnx.read_onnx`), the input shape (read
    or ``--input-shape``), the size of the input batches and of the activations (ONNX shape inference,
    before anything is converted or run), conversion, then the fidelity check against onnxruntime on
    the self-contained model -- or, without it, one run of the converted module on inputs in [0, 1]
    whose outputs must be finite.

    Warnings
    --------
    Refuses (exit 2) what :func:`read_onnx` refuses; symbolic input dimensions without
    ``--input-shape``, or an ``--input-shape`` that contradicts the file; input batches or activations
    over the memory limit; a converted module that does not run; non-finite outputs; a fidelity
    failure (:class:`~lipverify.errors.FidelityError`).
    """
    from lipverify.importers.fx import TRACE_BATCH

    path_str = str(path)
    model, onnx_bytes, largest = read_onnx(path)
    declared = onnx_input_shape(model, path)
    per_example = declared[1:]
    if shape is None:
        if any(d is None for d in per_example) or not per_example:
            raise UserInputError("the ONNX input has symbolic dimensions: pass --input-shape", path_str)
        shape = tuple(per_example)
    elif (all(d is not None for d in per_example) and tuple(per_example) != shape) or \
            (declared and len(per_example) != len(shape)):
        shown = ",".join("?" if d is None else str(d) for d in per_example)
        raise UserInputError(f"--input-shape {','.join(map(str, shape))} does not match the model's "
                             f"input shape {shown}", path_str)
    n_fid = 8 + (min(32, len(fidelity_inputs)) if fidelity_inputs is not None else 0)
    runs = [(TRACE_BATCH, "importing the model (every activation kept)", True)]
    if fidelity_check:
        runs.append((n_fid, "the fidelity check against onnxruntime", False))
        check_input_size(shape, n_fid, path_str, "the fidelity check's input batch")
    check_input_size(shape, TRACE_BATCH + 1, path_str)
    estimate_memory(model, declared[0], shape, path_str, runs)
    module = convert_onnx(model, path, notes)
    hint = weight_hint(largest)
    if not fidelity_check:
        notes.append("fidelity check skipped (--no-fidelity-check)")
        _check_finite_outputs(module, shape, path_str, hint)
        return module, shape, None
    batch_shape = (declared[0] if declared[0] is not None else None,) + tuple(shape)
    try:
        fidelity = onnx_fidelity(onnx_bytes, module, batch_shape, shape, fidelity_inputs, tolerance=tolerance,
                                 path=path_str, weight_hint=hint)
    except UserInputError:
        raise
    except Exception:
        x1 = torch.rand((2,) + tuple(shape))
        raise UserInputError("the module onnx2torch converted the file to does not run: "
                             f"{explain_run_failure(module, x1)}", path_str) from None
    if not fidelity.passed:
        raise FidelityError(
            f"the converted model differs from onnxruntime by {fidelity.max_abs_diff:.3g} "
            f"(relative {fidelity.max_rel_diff:.3g} > {tolerance:g}) on input "
            f"#{fidelity.worst_input}; pass --no-fidelity-check to analyse it anyway", path_str)
    return module, shape, fidelity


def _check_finite_outputs(module, shape, path_str: str, hint, explain: bool = True) -> None:
    """Run ``module`` on two inputs in [0, 1]; refuse non-finite outputs, and (``explain``) a module
    that fails, naming the node (else the failure is left to the graph import, which names it).
    ``hint`` (text, or a function giving it, computed only on a refusal) names the largest weight."""
    from lipverify.importers.fidelity import not_finite_message
    from lipverify.importers.fx import TRACE_BATCH

    x = torch.rand((TRACE_BATCH,) + tuple(shape), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = module(x)
    except Exception:
        if not explain:
            return
        raise UserInputError("the module onnx2torch converted the file to does not run: "
                             f"{explain_run_failure(module, x)}", path_str) from None
    if isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise UserInputError(not_finite_message("inputs in [0,1]", hint() if callable(hint) else hint), path_str)


def _largest_weight(module: nn.Module) -> tuple[float, str] | None:
    """The largest magnitude among the module's floating-point parameters and buffers, and where."""
    best = None
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and t.numel():
            v = float(t.detach().abs().max())
            if best is None or not v <= best[0]:
                best = (v, f"tensor {name!r}")
    return best


def check_input_size(shape, batch: int, path, what: str = "an input batch") -> None:
    """Refuse (exit 2) a per-example ``shape`` whose float32 batch of ``batch`` (and one copy) exceeds
    the memory limit."""
    n = math.prod(int(d) for d in shape)
    check_alloc(2 * 4 * n * batch, f"{what} of {batch} x {','.join(map(str, shape))} float32", path)


def check_classes(graph, path) -> None:
    """At most :data:`~lipverify.limits.MAX_CLASSES` outputs (the margin constants are m x m)."""
    m = math.prod(graph.nodes[graph.output].out_shape)
    if m > MAX_CLASSES:
        raise UserInputError(f"the model has {m:,} outputs (classes), over the limit of {MAX_CLASSES:,}", path)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--device {name}: CUDA is not available on this machine")
    if name not in ("cpu",) and not name.startswith("cuda") and name != "mps":
        raise UserInputError(f"--device must be cpu, cuda, cuda:N, mps or auto, got {name!r}")
    return name


