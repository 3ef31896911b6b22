"""PyTorch files: state dicts (``torch.load(weights_only=True)``) built into the ``--arch`` network,
TorchScript, ``torch.export`` programs, and pickled modules (refused unless ``trust_pickle``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from lipverify.errors import UserInputError


class Unregistered(nn.Module):
    """Wraps a module that refuses ``train()``/``eval()`` (a ``torch.export`` program) for tracing."""

    def __init__(self, inner):
        super().__init__()
        for prm in inner.parameters():
            prm.requires_grad_(False)
        object.__setattr__(self, "wrapped", inner)

    def forward(self, x):
        return self.wrapped(x)

    def _apply(self, fn, recurse=True):
        # dtype / device moves (``.double()``, ``.to(device)``) reach the wrapped program too, so that
        # the float64 copy used by certificates and attacks really computes in float64
        self.wrapped._apply(fn)
        return super()._apply(fn, recurse)


def import_arch(spec: str) -> nn.Module:
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


def extract_state_dict(obj, path):
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if isinstance(obj, (list, tuple)) and len(obj) >= 1 and isinstance(obj[0], dict):
        obj = obj[0]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise UserInputError("does not contain a state dict (a mapping of parameter names to tensors)", str(path))


def _example_shape(ep) -> tuple[int, ...] | None:
    """The per-example input shape recorded in a torch.export program (static dimensions only)."""
    try:
        user = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
        if len(user) != 1:
            return None
        dims = user[0].meta["val"].shape[1:]
        out = tuple(int(d) for d in dims)
        return out if out and all(d > 0 for d in out) else None
    except Exception:  # symbolic or missing metadata: the user passes --input-shape
        return None


def load_torch_file(path: Path, arch: str | None, trust_pickle: bool, input_shape):
    """Returns (module, notes, via_onnx_bytes or None)."""
    notes = []
    if path.suffix == ".pt2":
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:
            raise UserInputError(f"not a torch.export program: {str(exc).splitlines()[0]}", str(path)) from None
        wrapped = Unregistered(ep.module())
        wrapped.example_shape = _example_shape(ep)
        return wrapped, ["torch.export program"], "pt2"
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
    sd = extract_state_dict(obj, path)
    if arch is None:
        raise UserInputError("is a state dict: pass --arch FILE_OR_MODULE:CALLABLE that builds the network",
                             str(path))
    net = import_arch(arch)
    try:
        net.load_state_dict(sd, strict=True)
    except Exception as exc:
        first = str(exc).replace("\n", " ").replace("\t", " ")
        raise UserInputError(f"state dict does not fit the --arch network: {first[:300]}", str(path)) from None
    notes.append(f"state dict loaded into {arch}")
    return net.eval(), notes, False
