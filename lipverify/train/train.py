"""Training the certifiable architectures of the papers from scratch: the job behind ``lipverify train``.

``train(arch, data, eps, out)`` builds a zoo architecture (:mod:`lipverify.models.zoo`) at random
initialisation (``--seed``), writes it to ``out/init.onnx`` and runs the fine-tuning job on it
(:func:`lipverify.train.finetune.finetune`): the same losses, schedules, checkpoints, exact resume,
devices, DDP, re-verification and report.  What differs are the defaults, which follow the papers:

==================  =====================================================================================
architecture        defaults
==================  =====================================================================================
``2c2f`` ``4c3f``   GloRo (Leino et al. 2021): loss ``gloro``, training eps 1.1 x eps with the ``log`` ramp
``6c2f`` ``8c2f``   over half the run, Adam 1e-3 with warm-up and cosine decay; ``-minmax`` for MinMax
``liresnet-lLwW``   LiResNet (Hu et al. 2023): loss ``emma``, the ``liresnet`` eps ramp (0.1 -> 1.5 eps),
                    MinMax, last-layer normalisation, Adam 1e-3 with warm-up and cosine decay
==================  =====================================================================================

Epochs default to 20 (a CPU-sized run; the papers train for hundreds of epochs on GPUs).  The input
shape defaults to the architecture's dataset (MNIST 1x28x28 for ``2c2f``/``4c3f``, CIFAR 3x32x32 for
``6c2f``/LiResNet, 3x64x64 for ``8c2f``) and is set with ``input_shape``; the number of classes is read
from the training labels.

``linf-dist-DxW`` (l-inf distance nets, Zhang et al. 2021) are trained by
:func:`lipverify.train.linf.train_linf_dist` with the same loop (their loss, lp schedule and outputs
are described there).
"""

from __future__ import annotations

import re

import torch

from lipverify.errors import UserInputError

__all__ = ["ARCH_DEFAULTS", "TRAIN_ARCHITECTURES", "architecture_shape", "build_architecture", "train"]

#: the names ``lipverify train --arch`` accepts (``<L>``, ``<W>``: depth and width)
TRAIN_ARCHITECTURES = ("2c2f", "4c3f", "6c2f", "8c2f", "2c2f-minmax", "4c3f-minmax", "6c2f-minmax", "8c2f-minmax",
                       "liresnet-l<L>w<W>", "linf-dist-<depth>x<width>")

_CONV_SHAPES = {"2c2f": (1, 28, 28), "4c3f": (1, 28, 28), "6c2f": (3, 32, 32), "8c2f": (3, 64, 64)}
_CONV_RE = re.compile(r"^(2c2f|4c3f|6c2f|8c2f)(?:-(relu|minmax))?$")
_LIRESNET_RE = re.compile(r"^liresnet-?l(\d+)w(\d+)$")

#: the papers' training defaults per family (everything else: the fine-tuning defaults)
ARCH_DEFAULTS = {
    "conv": {"loss": "gloro", "eps_mult": 1.1, "eps_schedule": "log", "epochs": 20, "lr": 1e-3},
    "liresnet": {"loss": "emma", "eps_mult": 1.0, "eps_schedule": "liresnet", "epochs": 20, "lr": 1e-3,
                 "lln": True},
}


def architecture_shape(name: str, input_shape=None) -> tuple:
    """The input shape ``train`` uses for ``name``: ``input_shape``, else the architecture's dataset's."""
    key = name.strip().lower()
    m = _CONV_RE.match(key)
    if not (m or _LIRESNET_RE.match(key)):
        raise UserInputError(f"unknown architecture {name!r}; known: {', '.join(TRAIN_ARCHITECTURES)}")
    if input_shape:
        return tuple(input_shape)
    return _CONV_SHAPES[m.group(1)] if m else (3, 32, 32)


def build_architecture(name: str, input_shape=None, n_classes: int = 10, seed: int = 0):
    """``(module, family, input_shape)`` for a ``lipverify train --arch`` name, at random initialisation."""
    from lipverify.models import zoo

    key = name.strip().lower()
    torch.manual_seed(int(seed))
    m = _CONV_RE.match(key)
    if m:
        shape = architecture_shape(name, input_shape)
        if len(shape) != 3:
            raise UserInputError(f"--input-shape must be C,H,W for {name}, got {shape}")
        if shape[1] != shape[2]:
            raise UserInputError(f"{name} needs square images, got {shape}")
        try:
            net = zoo.build(m.group(1), in_ch=shape[0], in_size=shape[1], n_classes=n_classes,
                            activation=m.group(2) or "relu")
        except ValueError as exc:
            raise UserInputError(f"--arch {name}: {exc}") from None
        return net.eval(), "conv", shape
    m = _LIRESNET_RE.match(key)
    if m:
        shape = architecture_shape(name, input_shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise UserInputError(f"{name} needs square images C,H,W, got {shape}")
        try:
            net = zoo.liresnet(depth=int(m.group(1)), width=int(m.group(2)), in_ch=shape[0], in_size=shape[1],
                               n_classes=n_classes)
        except ValueError as exc:
            raise UserInputError(f"--arch {name}: {exc}") from None
        # the head is normalised by the training job (--lln): start from a plain dense layer
        head = net[-1]
        plain = torch.nn.Linear(head.in_features, head.out_features)
        with torch.no_grad():
            plain.weight.copy_(head.weight)
            plain.bias.copy_(head.bias)
        net[-1] = plain
        return net.eval(), "liresnet", shape
    raise UserInputError(f"unknown architecture {name!r}; known: {', '.join(TRAIN_ARCHITECTURES)}")


def _n_classes(data_path, shape, layout) -> int:
    from lipverify.data import load_data

    ds = load_data(data_path, shape, layout=layout)
    if not ds.labelled:
        raise UserInputError("training needs labelled examples", str(data_path))
    return max(2, int(ds.y.max()) + 1)


def train(arch: str, data_path, eps, out_dir, *, input_shape=None, echo=None, **options) -> dict:
    """Train ``arch`` from scratch (see the module docstring); the Python form of ``lipverify train``.

    ``options`` are those of :func:`lipverify.train.finetune.finetune` except ``model`` and ``arch``;
    ``None`` (or absent) takes the architecture's default.  Returns the job's report.
    """
    from lipverify.data.atomic import atomic_write_bytes, check_output
    from lipverify.importers.onnx import export_to_onnx
    from lipverify.train.finetune import FINETUNE_DEFAULTS, finetune
    from lipverify.train.linf import LINF_RE, train_linf_dist

    shape = None
    if input_shape is not None:
        shape = tuple(int(v) for v in (str(input_shape).split(",") if isinstance(input_shape, str) else input_shape))
    if LINF_RE.match(arch.strip().lower()):
        keep = ("epochs", "batch_size", "lr", "seed", "eval_data", "eval_limit", "limit", "layout", "device",
                "resume", "force", "quiet", "stop_after_epochs")
        return train_linf_dist(arch, data_path, eps, out_dir, input_shape=shape, echo=echo,
                               **{k: v for k, v in options.items() if k in keep and v is not None})
    for bad in ("model", "arch", "input_shape"):
        if options.get(bad) is not None:
            raise TypeError(f"train() sets {bad} itself")
        options.pop(bad, None)
    shape = architecture_shape(arch, shape)
    out = check_output(out_dir, data_path, options.get("eval_data"), folder=True)  # before any work
    n_classes = _n_classes(data_path, shape, options.get("layout") or "nchw")
    net, family, shape = build_architecture(arch, shape, n_classes, options.get("seed") or 0)
    out.mkdir(parents=True, exist_ok=True)
    init = out / "init.onnx"
    data = export_to_onnx(net, shape, None)
    if init.exists() and options.get("resume"):
        pass  # the run's own initial network (the checkpoint knows its fingerprint)
    elif init.exists() and init.read_bytes() != data and not options.get("force"):
        raise UserInputError(f"{init} holds another initial network; use a new --out folder or --force", str(out))
    elif not init.exists() or init.read_bytes() != data:
        atomic_write_bytes(init, data)
    opts = {k: v for k, v in FINETUNE_DEFAULTS.items() if k not in ("model", "arch", "input_shape")}
    opts.update(ARCH_DEFAULTS[family])
    opts.update({k: v for k, v in options.items() if v is not None and k in FINETUNE_DEFAULTS})
    if family == "liresnet":
        opts["lln"] = True  # the LLN head is part of the architecture (the CLI flag's False is no choice here)
    opts["from_scratch"] = True
    rep = finetune(data_path, eps, out_dir, echo=echo, model=str(init), **opts)
    if rep:
        rep["architecture"] = {"name": arch, "family": family, "input_shape": list(shape), "classes": n_classes,
                               "defaults": ARCH_DEFAULTS[family]}
    return rep
