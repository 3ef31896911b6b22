"""Data in and evidence out: one module per input format, and the files lipverify writes.

* :mod:`~lipverify.data.load` — :func:`load_data` (dispatch by format) and :func:`load_for_model`;
* :mod:`~lipverify.data.npz`, :mod:`~lipverify.data.folders`, :mod:`~lipverify.data.vnnlib` — the
  formats (VNN-LIB text is parsed by :mod:`~lipverify.data.vnnlib_parse` and
  :mod:`~lipverify.data.vnnlib_dnf`, without recursion and in linear time);
  :mod:`~lipverify.data.dataset` — the :class:`Dataset` they return and the shared checks;
* :mod:`~lipverify.data.files` — listing data folders without following links out of them or
  touching devices and FIFOs;
* :mod:`~lipverify.data.atomic` — atomic writes, and the rule that no input is ever overwritten;
* :mod:`~lipverify.data.counterexamples` — competition-format counterexample files.

May import :mod:`lipverify.errors` and itself; it knows nothing of bounds, attacks or the CLI.
"""

from lipverify.data.dataset import Dataset
from lipverify.data.folders import IMAGE_SUFFIXES
from lipverify.data.load import load_data, load_for_model

__all__ = ["Dataset", "IMAGE_SUFFIXES", "load_data", "load_for_model"]
