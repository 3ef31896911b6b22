"""Fidelity check: does the converted torch module compute the same function as the ONNX file?

A certificate about a different function than the file is worthless, so every ONNX import runs the
converted module and onnxruntime on the same inputs (random inputs, plus real ones when given) and
reports the largest absolute and relative difference (relative to the largest reference logit).

onnxruntime gets the model as bytes with any external data already attached and checked
(:mod:`lipverify.importers.onnx_safety`), so it never opens a file itself.  Its logging is silenced
(severity 4: the default logger before the first session is created, each session and each run):
its coloured ``[E:onnxruntime]`` lines never reach the user's terminal.

Warnings
--------
Refused with :class:`~lipverify.errors.UserInputError` (exit 2, one line): onnxruntime cannot load
the model or fails to run it (its own reason, first line), and outputs that are not finite (on
either side; the message names the largest weight when known).  A failure of the converted module
itself is raised as is, for the caller to explain (:func:`lipverify.importers.onnx.explain_run_failure`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lipverify.errors import UserInputError

#: largest accepted difference, relative to max(1, largest |logit| of the reference)
DEFAULT_TOLERANCE = 1e-4


@dataclass
class Fidelity:
    reference: str
    max_abs_diff: float
    max_rel_diff: float
    n_inputs: int
    tolerance: float
    passed: bool
    worst_input: int

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"fidelity vs {self.reference}: max |diff| {self.max_abs_diff:.3g}, relative "
                f"{self.max_rel_diff:.3g} over {self.n_inputs} inputs (tolerance {self.tolerance:g}) {verdict}")


def ort_session(onnx_bytes: bytes, path=None):
    """An onnxruntime CPU session of ``onnx_bytes`` with its logging silenced; its errors as one line."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # errors come back as exceptions; its own lines would reach the terminal
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        return ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UserInputError(f"onnxruntime cannot load the model: {ort_message(exc)}", path) from None


def ort_message(exc: Exception) -> str:
    """onnxruntime's error without its ``[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :`` prefix, one line."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    first = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*", "", first)
    head, sep, status = first.partition(" Status Message: ")
    if sep:  # drop the C++ source location and the failed condition
        status = status.split(" was false. ", 1)[-1]
        first = f"{head} {status}"
    return first[:300]


def not_finite_message(where: str, hint: str) -> str:
    return f"the model's outputs are not finite on {where}{hint}"


def onnx_fidelity(onnx_bytes: bytes, module: torch.nn.Module, batch_shape: tuple[int, ...],
                  input_shape: tuple[int, ...], real_inputs: torch.Tensor | None = None, n_random: int = 8,
                  tolerance: float = DEFAULT_TOLERANCE, seed: int = 0, path: str | None = None,
                  weight_hint: str = "") -> Fidelity:
    """Compare ``module`` with onnxruntime on random inputs in [0, 1] and on ``real_inputs``.

    ``batch_shape`` is the ONNX input's declared shape: when its batch dimension is fixed, inputs
    are run one at a time.  ``path`` names the file in messages; ``weight_hint`` is appended to the
    message about non-finite outputs.
    """
    import onnxruntime as ort

    sess = ort_session(onnx_bytes, path)
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    inp = sess.get_inputs()[0]
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand((n_random,) + tuple(input_shape), generator=g)]
    if real_inputs is not None and len(real_inputs):
        xs.append(real_inputs[:32].reshape((-1,) + tuple(input_shape)).float())
    x = torch.cat(xs)
    fixed_batch = isinstance(batch_shape[0], int) and batch_shape[0] > 0
    ref = []
    try:
        if fixed_batch:
            for i in range(0, len(x), batch_shape[0]):
                chunk = x[i:i + batch_shape[0]]
                if len(chunk) < batch_shape[0]:
                    break
                ref.append(sess.run(None, {inp.name: chunk.reshape(batch_shape).numpy()}, run_options)[0])
            x = x[:len(ref) * batch_shape[0]]
        else:
            ref.append(sess.run(None, {inp.name: x.numpy()}, run_options)[0])
    except Exception as exc:
        shape = tuple(batch_shape) if fixed_batch else (len(x),) + tuple(input_shape)
        raise UserInputError(f"onnxruntime fails to run the model on an input of shape {shape}: {ort_message(exc)}",
                             path) from None
    ref_arr = np.concatenate([r.reshape(len(r) if not fixed_batch else batch_shape[0], -1) for r in ref])
    _check_finite(ref_arr, n_random, path, weight_hint)
    with torch.no_grad():
        got = module(x).reshape(len(x), -1).double().numpy()
    _check_finite(got, n_random, path, weight_hint)
    diff = np.abs(got - ref_arr.astype(np.float64))
    per_input = diff.max(axis=1)
    max_abs = float(per_input.max())
    scale = max(1.0, float(np.abs(ref_arr).max()))
    max_rel = max_abs / scale
    return Fidelity("onnxruntime", max_abs, max_rel, len(x), tolerance, max_rel <= tolerance,
                    int(per_input.argmax()))


def _check_finite(out: np.ndarray, n_random: int, path, hint: str) -> None:
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        where = "inputs in [0,1]" if bad[:n_random].any() else "the data's inputs"
        raise UserInputError(not_finite_message(where, hint), path)
