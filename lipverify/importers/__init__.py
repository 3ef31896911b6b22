"""From a user's file to a :class:`~lipverify.model.LipModel`: one module per source.

* :mod:`~lipverify.importers.loader` — the public :func:`load` (dispatch by source, outside
  normalisation, fidelity check, the graph-reproduces-model check) and :func:`resolve_device`;
* :mod:`~lipverify.importers.onnx` — ONNX files (onnx2torch) and exporting to ONNX;
  :mod:`~lipverify.importers.onnx_safety` — the checks of an untrusted file (size, nodes, external
  data confined to the model's folder, finite weights, inputs and outputs);
  :mod:`~lipverify.importers.onnx_memory` — the activations' memory from shape inference;
  :mod:`~lipverify.importers.onnx_convert` — onnx2torch's converter in linear time;
  :mod:`~lipverify.importers.fidelity` — the comparison with onnxruntime;
* :mod:`~lipverify.importers.torchfile` — state dicts with ``--arch``, TorchScript, ``.pt2``, pickles;
* :mod:`~lipverify.importers.fx` — fx graphs to Lipschitz graphs; :mod:`~lipverify.importers.aten` —
  torch.export aten graphs; :mod:`~lipverify.importers.optable` — the op tables they share;
* :mod:`~lipverify.importers.normalize` — normalisation outside the model.

May import :mod:`lipverify.graph`, :mod:`lipverify.models` (layers it recognises), :mod:`lipverify.errors`
and, to build the result, :mod:`lipverify.model`; never an analysis, attack, report or the CLI.
"""

from lipverify.importers.loader import BUILTIN_DEFAULT, load, resolve_device

__all__ = ["BUILTIN_DEFAULT", "load", "resolve_device"]
