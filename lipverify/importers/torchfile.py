"""PyTorch files: state dicts (``torch.load(weights_only=True)``) built into the ``--arch`` network,
TorchScript, ``torch.export`` programs (``.pt2``), and pickled modules (refused unless ``trust_pickle``).

Every file may come from a stranger, and loading a PyTorch file can run code: a pickle calls whatever
it names, and ``torch.export.load`` unpickles parts of a ``.pt2`` archive with ``weights_only=False``,
``eval``s its symbolic-size expressions (``sympy.sympify``), compiles its guards and resolves its node
targets to any callable reachable from ``torch``.  What is checked, before anything of the file runs:

* the path is a non-empty regular file of at most :data:`~lipverify.limits.MAX_MODEL_BYTES` (FIFOs,
  devices and directories are refused by what they are: :func:`lipverify.limits.open_regular`);
* state dicts and other ``torch.save`` files load with ``weights_only=True`` only; a file that needs
  more is a pickled object and is refused unless ``trust_pickle`` (``--trust-pickle``);
* a ``.pt2`` archive is read once into memory and inspected (:func:`inspect_pt2`) against a whitelist
  before ``torch.export.load`` reads the same bytes; its graph is checked again after loading
  (:func:`check_program_ops`): only ATen operators without effects outside the program run;
* a TorchScript file is read once into memory; no record may define ``__setstate__`` (which
  ``torch.jit.load`` runs) or name a TorchBind class
  (:func:`~lipverify.importers.torchscript_check.inspect_torchscript_archive`), and after loading,
  before the module ever runs, every graph of every method, its calls inlined, holds only ATen
  operators without effects outside the module and TorchScript data flow
  (:func:`~lipverify.importers.torchscript_check.check_torchscript_graphs`: ``aten::from_file``,
  ``aten::save``, ``aten::_print`` and ``prim::Print`` are refused);
* the weights of every loaded network are finite (:func:`check_finite_params`).

Every refusal is a :class:`~lipverify.errors.UserInputError`: exit 2 and one line naming the file.

Warnings
--------
* ``trust_pickle`` turns every one of these checks on content off (the file checks stay): the file is
  loaded the way torch loads it, which runs whatever code it holds.
* TorchScript runs inside ``torch.jit.load`` (the ``__setstate__`` of every object that defines one)
  and whenever lipverify runs the module; its checks whitelist torch 2.14's operators by schema (see
  :mod:`lipverify.importers.torchscript_check` for what they let through).
* :func:`import_arch` imports and runs the ``--arch`` file: it is code the user chose to run.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import re
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from lipverify.errors import UserInputError
from lipverify.importers.pt2_check import check_program_ops, first_line, inspect_pt2, quiet_torch
from lipverify.importers.torchscript_check import check_torchscript_graphs, inspect_torchscript_archive
from lipverify.limits import MAX_MODEL_BYTES, check_alloc, check_regular, fmt_bytes, open_regular, read_capped

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


# -- reading files ----------------------------------------------------------------------------------------

def _open_model(path: Path):
    """A binary file object for ``path`` once it is known to be a non-empty regular file of at most
    :data:`~lipverify.limits.MAX_MODEL_BYTES` (:func:`lipverify.limits.open_regular`: FIFOs, devices and
    directories are refused by what they are, and the open descriptor is the file that was checked)."""
    return open_regular(path, "model file", MAX_MODEL_BYTES)


def _read_model(path: Path) -> bytes:
    """The bytes of a model file (checks of :func:`_open_model`, plus the memory limit)."""
    size = check_regular(path, "model file").st_size
    check_alloc(size, f"reading the model file ({fmt_bytes(size)})", path)
    return read_capped(path, MAX_MODEL_BYTES, "model file")


# -- finite weights -------------------------------------------------------------------------------------

def check_finite_params(module_or_state_dict, path) -> None:
    """Refuse (exit 2) a network whose weights hold NaN or infinity, naming the first such tensor.

    ``module_or_state_dict`` is an ``nn.Module`` (every parameter and buffer, by its qualified name) or a
    mapping of names to tensors (a state dict, a program's constants); entries that are not floating
    point or complex tensors are skipped.  A non-finite weight makes every Lipschitz bound ``inf`` or
    ``nan`` (an operator norm of a matrix with a NaN is NaN), so a file with one is a damaged or hostile
    file, never a model to certify.

    Warnings
    --------
    * Only tensors registered as parameters or buffers (or given in the mapping) are checked: a tensor
      kept as a plain attribute of a custom module is not seen.
    * Meta or fake tensors (no data) are skipped.
    """
    where = None if path is None else str(path)
    if isinstance(module_or_state_dict, nn.Module):
        m = module_or_state_dict
        items = list(m.named_parameters(remove_duplicate=True)) + list(m.named_buffers(remove_duplicate=True))
    else:
        items = list(dict(module_or_state_dict).items())
    for name, t in items:
        if not isinstance(t, torch.Tensor) or t.is_meta or not (t.is_floating_point() or t.is_complex()):
            continue
        try:
            ok = bool(torch.isfinite(t.detach()).all())
        except Exception:  # a tensor subclass that does not compute: not a weight lipverify can use either
            continue
        if not ok:
            bad = t.detach().reshape(-1)
            n_nan = int(torch.isnan(bad).sum())
            n_inf = int(torch.isinf(bad).sum())
            what = ", ".join(s for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} infinite" if n_inf else "") if s)
            raise UserInputError(f"weight {name!r} holds non-finite values ({what} of {bad.numel()}); a network "
                                 "with NaN or infinite weights has no finite Lipschitz bound", where)


def load_pt2(path: Path, trust_pickle: bool):
    """Read a ``.pt2`` file into an ``ExportedProgram`` and its module: one read of at most
    :data:`~lipverify.limits.MAX_MODEL_BYTES` from a regular file, :func:`inspect_pt2` on those bytes
    (skipped with ``trust_pickle``), ``torch.export.load`` on the same bytes with torch's logging
    silenced, ``module(check_guards=False)``, :func:`check_program_ops`, and
    :func:`check_finite_params` on the weights and constants.

    Warnings
    --------
    Every failure is one exit-2 line naming the file (a truncated archive included); with
    ``trust_pickle`` the archive is loaded the way torch loads it, pickles and all.
    """
    data = _read_model(path)
    if not trust_pickle:
        inspect_pt2(data, path)
    try:
        with quiet_torch():
            ep = torch.export.load(io.BytesIO(data))
            module = ep.module() if trust_pickle else ep.module(check_guards=False)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"not a loadable torch.export program: {first_line(exc)}", str(path)) from None
    if not trust_pickle:
        check_program_ops(module, path)
    tensors = dict(ep.state_dict)
    tensors.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    check_finite_params(tensors, path)
    return ep, module


def _looks_like_torchscript(fh) -> bool:
    try:
        with zipfile.ZipFile(fh) as zf:
            names = zf.namelist()
    except Exception:
        return False
    finally:
        fh.seek(0)
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_torch_file(path: Path, arch: str | None, trust_pickle: bool, input_shape):
    """Returns (module, notes, via_onnx_bytes or None).

    Checks (each an exit-2 line naming the file; see the module docstring): a regular file of at most
    ``MAX_MODEL_BYTES``; ``.pt2`` through :func:`load_pt2`; TorchScript through ``torch.jit.load``
    between :func:`inspect_torchscript_archive` and :func:`check_torchscript_graphs` (both skipped with
    ``trust_pickle``); anything else through ``torch.load(weights_only=True)``, a pickled object
    refused unless ``trust_pickle``; a state dict must fit ``--arch`` exactly; weights finite
    (:func:`check_finite_params`).

    Warnings
    --------
    A pickled module loaded with ``trust_pickle`` has run whatever code its file holds.
    """
    notes = []
    if path.suffix.lower() == ".pt2":
        ep, module = load_pt2(path, trust_pickle)
        wrapped = Unregistered(module)
        wrapped.example_shape = _example_shape(ep)
        return wrapped, ["torch.export program"], "pt2"
    with _open_model(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        check_alloc(size, f"loading the model file ({fmt_bytes(size)})", path)
        if _looks_like_torchscript(fh):
            # one read: the checks and torch.jit.load see the same bytes
            data = fh.read(size + 1)
            if len(data) > size:
                raise UserInputError("the model file grew while it was read; refusing", str(path))
            if not trust_pickle:
                inspect_torchscript_archive(data, path)
            try:
                with quiet_torch():
                    ts = torch.jit.load(io.BytesIO(data), map_location="cpu")
            except Exception as exc:
                raise UserInputError(f"could not load TorchScript: {first_line(exc)}", str(path)) from None
            if not trust_pickle:
                check_torchscript_graphs(ts, path)  # before the module ever runs
            ts = ts.eval()
            check_finite_params(ts, path)
            return ts, ["TorchScript module"], True
        try:
            with quiet_torch():
                obj = torch.load(fh, map_location="cpu", weights_only=True)
        except Exception as exc:
            msg = str(exc)
            if "weights_only" in msg or "Unsupported global" in msg or "WeightsUnpickler" in msg:
                if not trust_pickle:
                    raise UserInputError("holds a pickled Python object, which can run code when loaded; refusing. "
                                         "Pass --trust-pickle if you trust the file, or save a state_dict",
                                         str(path)) from None
                fh.seek(0)
                try:
                    with quiet_torch():
                        obj = torch.load(fh, map_location="cpu", weights_only=False)
                except Exception as exc2:
                    raise UserInputError(f"could not unpickle: {first_line(exc2)}", str(path)) from None
                if isinstance(obj, nn.Module):
                    check_finite_params(obj, path)
                    return obj.eval(), ["pickled module (loaded with --trust-pickle)"], False
            else:
                raise UserInputError("not a PyTorch file (torch.load failed: truncated or wrong format?)",
                                     str(path)) from None
    sd = extract_state_dict(obj, path)
    check_finite_params(sd, path)
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
