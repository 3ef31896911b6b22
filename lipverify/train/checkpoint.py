"""Checkpoints of a fine-tuning run: written atomically, resumed exactly.

A checkpoint is one ``torch.save`` dictionary written to a temporary file in the output folder and
renamed over ``checkpoint.pt`` (:func:`lipverify.data.atomic.atomic_write_bytes`), so a crash or a kill
leaves either the previous checkpoint or the new one, never half of one.  It holds everything the run
depends on: the network's state dict (surgery parameters included), the power-iteration vectors, the
optimiser, the learning-rate scheduler, the AMP scaler, the position (epoch and step inside it), the
history, the before-training evaluation, the configuration, a fingerprint of the input model and the
random-number generator states (torch, CUDA, numpy, Python).  The data order and the augmentations are
drawn from generators seeded by ``(seed, epoch, step)``, so a resumed run repeats exactly the batches
an uninterrupted run would have seen.

What is stored, and why: the checkpoint lives in ``--out``, a folder other people may be able to write
to, and ``finetune --resume`` reads it back.  A pickle can run code when it is loaded, so the checkpoint
holds only what ``torch.load(weights_only=True)`` rebuilds without calling anything but tensor
constructors: tensors, numbers, strings, ``None`` and plain lists / tuples / dicts.  :func:`save`
checks this before writing (numpy scalars become Python numbers; anything else is a bug, raised as
``TypeError``); the random-number states are stored as tensors and integers (:func:`rng_state`), and
:func:`load` reads with ``weights_only=True`` only, from a regular file of at most
:data:`MAX_CHECKPOINT_BYTES`.

Warnings
--------
* A checkpoint written before format version 2 (numpy's RNG state as a pickled ``ndarray``) is refused
  (exit 2): it cannot be read without unpickling arbitrary objects.  Start that run again with
  ``--force``.
* ``weights_only=True`` stops code from running; it does not make a tampered checkpoint's numbers
  trustworthy.  A checkpoint changed by someone else resumes a run they changed; the fine-tuned model
  is re-verified by the sound bound either way.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from lipverify.data.atomic import atomic_write_bytes
from lipverify.errors import UserInputError
from lipverify.limits import MAX_MODEL_BYTES, check_alloc, fmt_bytes, open_regular

#: format 2: only tensors, numbers, strings and plain containers (format 1 pickled numpy arrays)
VERSION = 2
NAME = "checkpoint.pt"
#: largest checkpoint read: the network, Adam's two moment buffers, the power-iteration vectors and the best
#: epoch's copy of the network
MAX_CHECKPOINT_BYTES = 5 * MAX_MODEL_BYTES


def file_fingerprint(path) -> str | None:
    """sha256 of a file (``None`` for a non-file source such as the embedded model)."""
    if path is None or not Path(str(path)).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    """The random-number generator states as tensors and numbers (``weights_only``-loadable).

    * ``torch``: :func:`torch.get_rng_state` (a uint8 tensor); ``cuda``: one per device;
    * ``numpy``: the MT19937 key (624 uint32 words) as an int64 tensor, the position, and the cached
      Gaussian (``has_gauss``, ``cached_gaussian``) of :func:`numpy.random.get_state`;
    * ``python``: :func:`random.getstate` as ``[version, [624 + 1 ints], gauss_next]``.
    """
    name, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"name": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
                    "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "python": [int(version), [int(v) for v in internal], None if gauss_next is None else float(gauss_next)]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict, path: str | os.PathLike | None = None) -> None:
    """Restore the states written by :func:`rng_state`.

    Warnings
    --------
    A state of the wrong shape or type (a damaged or hand-edited checkpoint) raises
    :class:`~lipverify.errors.UserInputError` naming ``path``; nothing is restored then.
    """
    try:
        torch_state = st["torch"]
        npst = st["numpy"]
        key = npst["key"]
        if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8
                and isinstance(key, torch.Tensor) and key.shape == (624,)):
            raise TypeError("tensors of the wrong type or shape")
        np_state = (str(npst["name"]), key.numpy().astype(np.uint32), int(npst["pos"]), int(npst["has_gauss"]),
                    float(npst["cached_gaussian"]))
        version, internal, gauss_next = st["python"]
        py_state = (int(version), tuple(int(v) for v in internal), None if gauss_next is None else float(gauss_next))
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise UserInputError(f"the checkpoint's random-number state is damaged ({exc})",
                             None if path is None else str(path)) from None
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except RuntimeError:
            pass


_PLAIN = (int, float, bool, str, type(None))


def plain(obj, where: str = "checkpoint"):
    """``obj`` with numpy scalars turned into Python numbers, checked to hold only what
    ``torch.load(weights_only=True)`` rebuilds: tensors, ``int``, ``float``, ``bool``, ``str``, ``None``,
    and lists, tuples and dicts (``OrderedDict`` too) of them.

    Warnings
    --------
    Raises ``TypeError`` naming the entry for anything else (a numpy array, a dataclass, a function):
    that is a bug in the code that built the checkpoint, not a user error.
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            raise TypeError(f"{where}: tensor subclass {type(obj).__name__} cannot be stored in a checkpoint")
        return obj
    if type(obj) in _PLAIN:
        return obj
    if type(obj) in (list, tuple):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if type(obj) in (dict, OrderedDict):
        out = type(obj)()
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be stored in a checkpoint")
            out[k] = plain(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in a checkpoint "
                    "(only tensors, numbers, strings and plain containers load with weights_only=True)")


def save(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (plus the format version and the RNG states) atomically to ``path``.

    Warnings
    --------
    Raises ``TypeError`` (a bug) when ``state`` holds anything :func:`plain` does not accept: such a
    checkpoint could not be resumed with ``weights_only=True``.
    """
    state = dict(state)
    state["version"] = VERSION
    state["rng"] = rng_state()
    state = plain(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint at ``path``, read with ``torch.load(weights_only=True)``.

    Checked, each an exit-2 :class:`~lipverify.errors.UserInputError` naming the file: it exists and is a
    regular file (a FIFO or device is refused by what it is, :func:`lipverify.limits.open_regular`), at
    most :data:`MAX_CHECKPOINT_BYTES` and within the memory limit; it unpickles with
    ``weights_only=True`` (a pickle that names any other global is refused *before* anything runs: the
    reason this checkpoint is safe to resume from a shared folder); it is a dict of this format version.

    Warnings
    --------
    Checkpoints of format version 1 (lipverify before the weights-only format) are refused; see the
    module docstring.
    """
    p = Path(path)
    if not p.exists():
        raise UserInputError("no checkpoint to resume from (run without --resume to start)", str(p))
    with open_regular(p, "checkpoint", MAX_CHECKPOINT_BYTES) as fh:
        size = os.fstat(fh.fileno()).st_size
        check_alloc(size, f"reading the checkpoint ({fmt_bytes(size)})", p)
        try:
            st = torch.load(fh, map_location=map_location, weights_only=True)
        except Exception as exc:
            msg = str(exc)
            if "weights_only" in msg or "Unsupported global" in msg or "WeightsUnpickler" in msg:
                raise UserInputError("the checkpoint holds pickled Python objects other than tensors and plain "
                                     "containers, which could run code when loaded; refusing (a checkpoint of an "
                                     "older lipverify? start the run again with --force)", str(p)) from None
            first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
            raise UserInputError(f"cannot read the checkpoint: {first}", str(p)) from None
    if not isinstance(st, dict) or st.get("version") != VERSION:
        raise UserInputError("not a lipverify fine-tuning checkpoint of this version (start the run again with "
                             "--force)", str(p))
    return st


RESUME_KEYS = ("loss", "eps", "eps_mult", "eps_schedule", "eps_ramp", "trades_lambda", "epochs", "batch_size",
               "lr", "warmup", "min_lr_factor", "weight_decay", "power_iters", "seed", "activation", "lln",
               "augment", "norm", "sparsity_weight", "amp", "limit", "limit_sampling", "data", "model", "mean", "std",
               "grad_clip", "residual_scale")


def check_resume_config(saved: dict, now: dict) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in RESUME_KEYS
             if saved.get(k) != now.get(k)]
    if diffs:
        raise UserInputError("--resume with different settings than the checkpoint (" + "; ".join(diffs)
                             + "); use the same options, or start a new run in another --out folder")
