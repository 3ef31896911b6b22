"""lipverify: audit neural-network classifiers someone else trained.

Sound Lipschitz bounds, certified robustness radii, attacks and certified fine-tuning, over one typed
Lipschitz graph built from an ONNX file or a PyTorch module.
"""

__version__ = "0.1.0"

from lipverify.errors import LipverifyError, UnsupportedOpError, UserInputError  # noqa: E402
from lipverify.importers.loader import BUILTIN_DEFAULT, load  # noqa: E402
from lipverify.model import LipModel  # noqa: E402

__all__ = ["load", "LipModel", "BUILTIN_DEFAULT", "LipverifyError", "UserInputError", "UnsupportedOpError"]
