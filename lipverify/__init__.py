"""lipverify: audit neural-network classifiers someone else trained.

Sound Lipschitz bounds, certified robustness radii, attacks and certified fine-tuning, over one typed
Lipschitz graph built from an ONNX file or a PyTorch module.
"""

__version__ = "0.1.0"

from lipverify.errors import LipverifyError, UnsupportedOpError, UserInputError  # noqa: E402

_LAZY = {"load": "lipverify.importers.loader", "BUILTIN_DEFAULT": "lipverify.importers.loader",
         "LipModel": "lipverify.model"}


def __getattr__(name):
    """``load``, ``LipModel`` and ``BUILTIN_DEFAULT`` on first use: ``import lipverify`` (and
    ``lipverify --help``) does not import torch."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lipverify' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

__all__ = ["load", "LipModel", "BUILTIN_DEFAULT", "LipverifyError", "UserInputError", "UnsupportedOpError"]
