"""Model zoo: the architectures of the Lipschitz-certification literature, and the default model.

Notation (SPEC section 8): ``c(C, K, S)`` is a convolution with ``C`` output channels, a ``K x K``
kernel, stride ``S`` and SAME padding; ``d(D)`` is a dense layer with ``D`` outputs.  An activation
follows every layer but the last (``activation="relu"`` or ``"minmax"``; MinMax is GroupSort-2,
Anil et al. 2019).

===========  =====================================================================  =============
name         layers                                                                 default input
===========  =====================================================================  =============
``2c2f``     c(16,4,2) c(32,4,2) d(100) d(10)                                       1 x 28 x 28
``4c3f``     c(32,3,1) c(32,4,2) c(64,3,1) c(64,4,2) d(512) d(512) d(10)            1 x 28 x 28
``6c2f``     c(32,3,1) c(32,3,1) c(32,4,2) c(64,3,1) c(64,3,1) c(64,4,2) d(512)     3 x 32 x 32
             d(10)
``8c2f``     c(64,3,1) c(64,3,1) c(64,4,2) c(128,3,1) c(128,4,2) c(256,3,1)         3 x 64 x 64
             c(256,4,2) d(200)   (also called ``7c1f``)
``liresnet`` stem, L scaled residual conv blocks, neck, d(512), LLN head               3 x 32 x 32
``mlp``      Flatten, then dense layers of the given sizes                          any
===========  =====================================================================  =============

The conv nets are those of GloRo (Leino, Wang and Fredrikson, "Globally-robust neural networks",
ICML 2021); LiResNet is from Hu, Zhang, Leino, Ma, Fredrikson and Mao, "Unlocking deterministic
robustness certification on ImageNet", NeurIPS 2023.

SAME padding.  A ``K x K`` convolution with stride ``S`` gets the symmetric zero padding
``P = (K - S) // 2``.  When ``K - S`` is even (every layer above: k3 s1 -> p1, k4 s2 -> p1,
k5 s2 -> p2) and the input side ``n`` is a multiple of ``S``, this is exactly TensorFlow's SAME
padding: output side ``ceil(n / S) = n / S``.  For an odd ``n`` with k4 s2 p1 the output side is
``(n - 1) / 2`` (one less than TensorFlow, which would pad asymmetrically); the builders compute
the actual sizes, so any input size works.  ``K - S`` odd (e.g. an even kernel at stride 1) would
need asymmetric padding and is refused.

All models are built from plain ``nn.Conv2d`` / ``nn.Linear`` / activations / ``nn.Flatten`` (and
the two small modules of :mod:`lipverify.models.layers` plus :class:`ScaledResidualConv`), so they
are ``torch.fx.symbolic_trace``-able and export to ONNX (opset 17, ``dynamo=False``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .layers import LastLayerNormalizedLinear, MinMax

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_INPUT_SHAPE",
    "DEFAULT_MODEL_FILE",
    "DEFAULT_SAMPLES_FILE",
    "ScaledResidualConv",
    "build",
    "c2f2",
    "c4f3",
    "c6f2",
    "c8f2",
    "default_model",
    "default_samples",
    "liresnet",
    "make_activation",
    "mlp",
    "same_padding",
]

#: Input shape (C, H, W) of the embedded default model (MNIST, raw pixels in [0, 1]).
DEFAULT_INPUT_SHAPE: tuple[int, int, int] = (1, 28, 28)
#: File names of the shipped artefacts, in the package directory.
DEFAULT_MODEL_FILE = "default_mnist.pt"
DEFAULT_SAMPLES_FILE = "default_samples.npz"

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "minmax": MinMax}


def make_activation(activation: str) -> nn.Module:
    """A fresh activation module: ``"relu"`` (``nn.ReLU``) or ``"minmax"`` (:class:`MinMax`)."""
    key = activation.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[key]()


def same_padding(kernel: int, stride: int) -> int:
    """Symmetric SAME padding ``(K - S) // 2`` for a ``K x K`` stride-``S`` conv (see module doc)."""
    if kernel < stride:
        return 0
    if (kernel - stride) % 2 != 0:
        raise ValueError(
            f"kernel {kernel} with stride {stride}: SAME padding would be asymmetric; "
            "use a kernel/stride pair with K - S even"
        )
    return (kernel - stride) // 2


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def _check_minmax_width(activation: str, width: int, where: str) -> None:
    if activation.lower() == "minmax" and width % 2 != 0:
        raise ValueError(f"MinMax needs an even width, but {where} has {width} units")


def _conv_dense(
    convs: Sequence[tuple[int, int, int]],
    dense: Sequence[int],
    in_ch: int,
    in_size: int,
    activation: str,
) -> nn.Sequential:
    """``c(C,K,S)...`` then Flatten then ``d(D)...``, activation after every layer but the last."""
    layers: list[nn.Module] = []
    ch, size = in_ch, in_size
    n_layers = len(convs) + len(dense)
    idx = 0
    for out_ch, k, s in convs:
        p = same_padding(k, s)
        layers.append(nn.Conv2d(ch, out_ch, kernel_size=k, stride=s, padding=p))
        size = _conv_out(size, k, s, p)
        if size < 1:
            raise ValueError(f"input size {in_size} is too small for this architecture")
        ch = out_ch
        idx += 1
        if idx < n_layers:
            _check_minmax_width(activation, out_ch, f"conv layer {idx}")
            layers.append(make_activation(activation))
    layers.append(nn.Flatten())
    features = ch * size * size
    for width in dense:
        layers.append(nn.Linear(features, width))
        features = width
        idx += 1
        if idx < n_layers:
            _check_minmax_width(activation, width, f"dense layer {idx}")
            layers.append(make_activation(activation))
    return nn.Sequential(*layers)


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """Fully connected net ``Flatten, d(sizes[1]), ..., d(sizes[-1])``.

    ``sizes[0]`` is the flattened input dimension (e.g. 784 for MNIST); an activation follows every
    dense layer but the last.  ``mlp([784, 256, 256, 10])`` is the verification-competition
    ``mnist-net_256x2`` shape.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2:
        raise ValueError("mlp needs at least an input and an output size")
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            _check_minmax_width(activation, b, f"dense layer {i + 1}")
            layers.append(make_activation(activation))
    return nn.Sequential(*layers)


def c2f2(
    in_ch: int = 1, in_size: int = 28, n_classes: int = 10, activation: str = "relu"
) -> nn.Sequential:
    """2C2F (GloRo, MNIST): c(16,4,2) c(32,4,2) d(100) d(n_classes).

    As an ``nn.Sequential``: ``[Conv, act, Conv, act, Flatten, Linear, act, Linear]``.  On 1 x 28 x 28
    the feature maps are 16 x 14 x 14 and 32 x 7 x 7 (1568 features).
    """
    return _conv_dense([(16, 4, 2), (32, 4, 2)], [100, n_classes], in_ch, in_size, activation)


def c4f3(
    in_ch: int = 1, in_size: int = 28, n_classes: int = 10, activation: str = "relu"
) -> nn.Sequential:
    """4C3F (GloRo, MNIST l2 1.58): c(32,3,1) c(32,4,2) c(64,3,1) c(64,4,2) d(512) d(512) d(n_classes)."""
    return _conv_dense(
        [(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)],
        [512, 512, n_classes],
        in_ch,
        in_size,
        activation,
    )


def c6f2(
    in_ch: int = 3, in_size: int = 32, n_classes: int = 10, activation: str = "relu"
) -> nn.Sequential:
    """6C2F (GloRo, CIFAR-10): c(32,3,1) c(32,3,1) c(32,4,2) c(64,3,1) c(64,3,1) c(64,4,2) d(512) d(n_classes)."""
    return _conv_dense(
        [(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)],
        [512, n_classes],
        in_ch,
        in_size,
        activation,
    )


def c8f2(
    in_ch: int = 3, in_size: int = 64, n_classes: int = 200, activation: str = "relu"
) -> nn.Sequential:
    """8C2F / "7C1F" (GloRo, Tiny-ImageNet), exactly as listed in SPEC section 8.

    c(64,3,1) c(64,3,1) c(64,4,2) c(128,3,1) c(128,4,2) c(256,3,1) c(256,4,2) d(n_classes):
    seven convolutions and one dense layer (on 64 x 64 the last feature map is 256 x 8 x 8).
    """
    return _conv_dense(
        [(64, 3, 1), (64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 4, 2), (256, 3, 1), (256, 4, 2)],
        [n_classes],
        in_ch,
        in_size,
        activation,
    )


class ScaledResidualConv(nn.Module):
    r"""LiResNet residual block ``x + (1/sqrt(L)) * beta ⊙ conv3x3(x)`` (Hu et al. 2023).

    ``conv`` is a bias-free 3 x 3, stride-1, padding-1 convolution from ``channels`` to ``channels``;
    ``beta`` is a learnable per-channel scale (initialised to 1) and ``scale = 1/sqrt(L)`` a constant
    fixed by the depth ``L`` of the network.  The block is *linear*:

    .. math::
        x \mapsto x + s\,\mathrm{diag}(\beta)\,K x = (I + s\,\mathrm{diag}(\beta) K)\,x ,

    i.e. a single 3 x 3 convolution whose kernel is ``s * beta[o] * K[o, i]`` plus the identity at the
    centre tap (``+1`` at ``[o, o, 1, 1]``).  Its Lipschitz constant is the operator norm of that one
    convolution, which can be much smaller than ``1 + s * ||diag(beta) K||`` (SPEC section 2).
    :meth:`merged_kernel` returns that kernel.  No normalisation layers are used.
    """

    def __init__(self, channels: int, scale: float, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("ScaledResidualConv needs an odd kernel size")
        self.channels = int(channels)
        self.scale = float(scale)
        self.conv = nn.Conv2d(
            channels, channels, kernel_size, stride=1, padding=kernel_size // 2, bias=False
        )
        self.beta = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.beta.view(1, -1, 1, 1) * self.conv(x)

    @torch.no_grad()
    def merged_kernel(self) -> torch.Tensor:
        """Kernel of the single convolution equal to the block: ``s*beta⊙K + identity at the centre``."""
        k = self.conv.weight.detach() * (self.scale * self.beta.detach()).view(-1, 1, 1, 1)
        c = self.conv.kernel_size[0] // 2
        idx = torch.arange(self.channels)
        k = k.clone()
        k[idx, idx, c, c] += 1.0
        return k

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale={self.scale:.6g}"


def _liresnet_stem(in_size: int) -> tuple[int, int, int]:
    """Stem ``(kernel, stride, padding)`` giving a 16 x 16 map for the sizes of the LiResNet paper."""
    if in_size == 32:  # CIFAR
        return 5, 2, 2
    if in_size == 64:  # Tiny-ImageNet
        return 7, 4, 3
    if in_size == 224:  # ImageNet
        return 14, 14, 0
    return 5, 2, 2


def liresnet(
    depth: int = 6,
    width: int = 128,
    in_ch: int = 3,
    in_size: int = 32,
    n_classes: int = 10,
    dense: int = 512,
    stem: tuple[int, int, int] | None = None,
) -> nn.Sequential:
    """LiResNet ``L{depth}W{width}`` (Hu et al., NeurIPS 2023), as in SPEC section 8.

    ``stem conv (W channels) -> MinMax -> L x [ScaledResidualConv(W, 1/sqrt(L)) -> MinMax] ->
    neck conv k4 s4 (W -> 2W) -> MinMax -> Flatten -> d(dense) -> MinMax -> LLN head``.

    The stem is ``(kernel, stride, padding)``; by default k5 s2 p2 (CIFAR, 32 -> 16), k7 s4 p3 for a
    64-pixel input (Tiny-ImageNet) and k14 s14 for 224 (ImageNet, use ``dense=2048`` there).  The
    activation is always MinMax and the head is a :class:`LastLayerNormalizedLinear`.
    """
    depth, width = int(depth), int(width)
    if depth < 1 or width < 1 or width % 2 != 0:
        raise ValueError("liresnet needs depth >= 1 and an even width >= 2")
    if dense % 2 != 0:
        raise ValueError("liresnet needs an even dense width (MinMax)")
    k, s, p = stem if stem is not None else _liresnet_stem(in_size)
    size = _conv_out(in_size, k, s, p)
    layers: list[nn.Module] = [nn.Conv2d(in_ch, width, k, stride=s, padding=p), MinMax()]
    scale = 1.0 / math.sqrt(depth)
    for _ in range(depth):
        layers += [ScaledResidualConv(width, scale), MinMax()]
    layers += [nn.Conv2d(width, 2 * width, 4, stride=4, padding=0), MinMax()]
    size = _conv_out(size, 4, 4, 0)
    if size < 1:
        raise ValueError(f"input size {in_size} is too small for liresnet")
    layers += [
        nn.Flatten(),
        nn.Linear(2 * width * size * size, dense),
        MinMax(),
        LastLayerNormalizedLinear(dense, n_classes),
    ]
    return nn.Sequential(*layers)


#: Architecture name -> builder.  Every builder returns an ``nn.Module`` mapping ``(B, C, H, W)``
#: (or any shape for ``mlp``) to ``(B, n_classes)`` logits.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "2c2f": c2f2,
    "4c3f": c4f3,
    "6c2f": c6f2,
    "8c2f": c8f2,
    "7c1f": c8f2,
    "liresnet": liresnet,
}

_LIRESNET_NAME = re.compile(r"^liresnet[-_]?l(\d+)w(\d+)$")


def build(name: str, **kw) -> nn.Module:
    """Build an architecture by name (case-insensitive), passing keyword arguments to its builder.

    Names: the keys of :data:`ARCHITECTURES` (``"c2f2"`` style spellings are also accepted), and
    ``"liresnet-L6W128"`` (depth and width in the name).
    """
    key = name.strip().lower()
    m = _LIRESNET_NAME.match(key)
    if m:
        return liresnet(depth=int(m.group(1)), width=int(m.group(2)), **kw)
    aliases = {"c2f2": "2c2f", "c4f3": "4c3f", "c6f2": "6c2f", "c8f2": "8c2f"}
    key = aliases.get(key, key)
    if key not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)} or 'liresnet-L<d>W<w>'"
        )
    return ARCHITECTURES[key](**kw)


def _package_file(name: str) -> Path:
    path = Path(__file__).resolve().parent / name
    if not path.exists():
        raise FileNotFoundError(
            f"the embedded artefact {name} is missing from the lipverify.models package; "
            "regenerate it with examples/train_default_model.py"
        )
    return path


def default_model() -> nn.Module:
    """The embedded default model: a 2C2F ReLU MNIST classifier, in eval mode.

    Input ``(B, 1, 28, 28)`` raw pixels in ``[0, 1]`` (no normalisation), output 10 logits.  Trained by
    ``examples/train_default_model.py`` on 5000 MNIST training images with a small GloRo-style
    Lipschitz-margin term, so that its l2 certificates are not vacuous.
    """
    model = c2f2(in_ch=1, in_size=28, n_classes=10, activation="relu")
    state = torch.load(_package_file(DEFAULT_MODEL_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def default_samples() -> tuple[torch.Tensor, torch.Tensor]:
    """32 MNIST test images ``x`` (float32, ``(32, 1, 28, 28)``, values ``k/255``) and labels ``y`` (int64)."""
    with np.load(_package_file(DEFAULT_SAMPLES_FILE)) as data:
        x = torch.from_numpy(np.ascontiguousarray(data["x"], dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(data["y"], dtype=np.int64))
    return x, y
