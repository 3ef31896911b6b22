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
from lipverify.importers.torchfile import Unregistered, load_torch_file

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
    from lipverify.importers.fx import build_graph, strip_to_logits, trace_module
    from lipverify.model import LipModel

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
        check_file(path)
        if path.suffix.lower() == ".onnx":
            model, onnx_bytes = read_onnx(path)
            declared = onnx_input_shape(model, path)
            per_example = declared[1:]
            if shape is None:
                if any(d is None for d in per_example) or not per_example:
                    raise UserInputError("the ONNX input has symbolic dimensions: pass --input-shape", path_str)
                shape = tuple(per_example)
            elif all(d is not None for d in per_example) and tuple(per_example) != shape:
                raise UserInputError(f"--input-shape {','.join(map(str, shape))} does not match the model's "
                                     f"input shape {','.join(map(str, per_example))}", path_str)
            module = convert_onnx(model, path, notes)
            needs_onnx = False
            if fidelity_check:
                batch_shape = (declared[0] if declared[0] is not None else None,) + tuple(shape)
                try:
                    fidelity = onnx_fidelity(onnx_bytes, module, batch_shape, shape, fidelity_inputs,
                                             tolerance=fidelity_tolerance)
                except UserInputError:
                    raise
                except Exception:
                    x1 = torch.rand((2,) + tuple(shape))
                    raise UserInputError("the module onnx2torch converted the file to does not run: "
                                         f"{explain_run_failure(module, x1)}", path_str) from None
                if not fidelity.passed:
                    raise FidelityError(
                        f"the converted model differs from onnxruntime by {fidelity.max_abs_diff:.3g} "
                        f"(relative {fidelity.max_rel_diff:.3g} > {fidelity_tolerance:g}) on input "
                        f"#{fidelity.worst_input}; pass --no-fidelity-check to analyse it anyway", path_str)
            else:
                notes.append("fidelity check skipped (--no-fidelity-check)")
        else:
            module, more, needs_onnx = load_torch_file(path, arch, trust_pickle, shape)
            notes.extend(more)
            hint = getattr(module, "example_shape", None)
            if shape is None and hint:
                shape = tuple(hint)
                notes.append(f"input shape {','.join(map(str, shape))} read from the program's example input")
    if shape is None:
        raise UserInputError("pass --input-shape (e.g. 1,28,28) for a PyTorch model", path_str)

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
    graph = build_graph(gm, shape, path_str or label)
    gm = strip_to_logits(gm, graph.logits_fx_node)
    if normalizer is not None:
        graph = prepend_normalizer(graph, normalizer, shape)
        notes.append("normalisation outside the model folded in: inputs and radii are in pixel space")
    graph = simplify(graph)
    pixel_module = PixelSpaceModel(Unregistered(gm) if isinstance(module, Unregistered) else gm, normalizer)
    lm = LipModel(pixel_module, graph, shape, label, fidelity=fidelity, notes=notes + graph.notes)
    lm.check_graph()
    return lm.to(device)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--device {name}: CUDA is not available on this machine")
    if name not in ("cpu",) and not name.startswith("cuda") and name != "mps":
        raise UserInputError(f"--device must be cpu, cuda, cuda:N, mps or auto, got {name!r}")
    return name


