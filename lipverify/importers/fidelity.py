"""Fidelity check: does the converted torch module compute the same function as the ONNX file?

A certificate about a different function than the file is worthless, so every ONNX import runs the
converted module and onnxruntime on the same inputs (random inputs, plus real ones when given) and
reports the largest absolute and relative difference (relative to the largest reference logit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

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


def onnx_fidelity(onnx_bytes: bytes, module: torch.nn.Module, batch_shape: tuple[int, ...],
                  input_shape: tuple[int, ...], real_inputs: torch.Tensor | None = None, n_random: int = 8,
                  tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> Fidelity:
    """Compare ``module`` with onnxruntime on random inputs in [0, 1] and on ``real_inputs``.

    ``batch_shape`` is the ONNX input's declared shape: when its batch dimension is fixed, inputs
    are run one at a time.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand((n_random,) + tuple(input_shape), generator=g)]
    if real_inputs is not None and len(real_inputs):
        xs.append(real_inputs[:32].reshape((-1,) + tuple(input_shape)).float())
    x = torch.cat(xs)
    fixed_batch = isinstance(batch_shape[0], int) and batch_shape[0] > 0
    ref = []
    if fixed_batch:
        for i in range(0, len(x), batch_shape[0]):
            chunk = x[i:i + batch_shape[0]]
            if len(chunk) < batch_shape[0]:
                break
            ref.append(sess.run(None, {inp.name: chunk.reshape(batch_shape).numpy()})[0])
        x = x[:len(ref) * batch_shape[0]]
    else:
        ref.append(sess.run(None, {inp.name: x.numpy()})[0])
    ref_arr = np.concatenate([r.reshape(len(r) if not fixed_batch else batch_shape[0], -1) for r in ref])
    with torch.no_grad():
        got = module(x).reshape(len(x), -1).double().numpy()
    diff = np.abs(got - ref_arr.astype(np.float64))
    per_input = diff.max(axis=1)
    max_abs = float(per_input.max())
    scale = max(1.0, float(np.abs(ref_arr).max()))
    max_rel = max_abs / scale
    return Fidelity("onnxruntime", max_abs, max_rel, len(x), tolerance, max_rel <= tolerance,
                    int(per_input.argmax()))
