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
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

import numpy as np
import torch

from lipverify.data.atomic import atomic_write_bytes
from lipverify.errors import UserInputError

VERSION = 1
NAME = "checkpoint.pt"


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
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except RuntimeError:
            pass


def save(path: str | os.PathLike, state: dict) -> None:
    state = dict(state)
    state["version"] = VERSION
    state["rng"] = rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    p = Path(path)
    if not p.exists():
        raise UserInputError("no checkpoint to resume from (run without --resume to start)", str(p))
    try:
        # the checkpoint holds numpy / python RNG states: plain containers, written by lipverify itself
        st = torch.load(str(p), map_location=map_location, weights_only=False)
    except Exception as exc:
        raise UserInputError(f"cannot read the checkpoint: {str(exc).splitlines()[0]}", str(p)) from None
    if not isinstance(st, dict) or st.get("version") != VERSION:
        raise UserInputError("not a lipverify fine-tuning checkpoint (or from another version)", str(p))
    return st


RESUME_KEYS = ("loss", "eps", "eps_mult", "eps_schedule", "eps_ramp", "trades_lambda", "epochs", "batch_size",
               "lr", "warmup", "min_lr_factor", "weight_decay", "power_iters", "seed", "activation", "lln",
               "augment", "norm", "sparsity_weight", "amp", "limit", "data", "model", "mean", "std")


def check_resume_config(saved: dict, now: dict) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in RESUME_KEYS
             if saved.get(k) != now.get(k)]
    if diffs:
        raise UserInputError("--resume with different settings than the checkpoint (" + "; ".join(diffs)
                             + "); use the same options, or start a new run in another --out folder")
