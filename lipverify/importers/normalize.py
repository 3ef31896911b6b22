"""Normalisation applied outside the model: parsing ``--mean/--std``, the ``Normalize`` module, the
pixel-space wrapper, and folding the normalisation into the front of a Lipschitz graph (so that
``1/std`` is part of every bound).
"""

from __future__ import annotations

import math

from typing import Sequence

import torch
import torch.nn as nn

from lipverify.errors import UserInputError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (axis 0 of the per-example shape)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


class PixelSpaceModel(nn.Module):
    """The user's model with its outside normalisation in front: a function of raw pixels."""

    def __init__(self, model: nn.Module, normalize: Normalize | None):
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, x):
        if self.normalize is not None:
            x = self.normalize(x)
        return self.model(x)


def parse_floats(text: str | Sequence[float] | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        parts = text if isinstance(text, (list, tuple)) else [v for v in str(text).split(",") if v.strip() != ""]
        vals = [float(v) for v in parts]
    except (TypeError, ValueError):
        raise UserInputError(f"{what} must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise UserInputError(f"{what} values must be finite numbers, got {bad[0]!r}")
    return vals


def parse_shape(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        dims = [int(v) for v in text]
    else:
        try:
            dims = [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise UserInputError(f"--input-shape must be comma-separated integers, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise UserInputError(f"--input-shape must be positive integers, got {text!r}")
    return tuple(dims)


def make_normalizer(mean, std, input_shape) -> Normalize | None:
    mean = parse_floats(mean, "--mean")
    std = parse_floats(std, "--std")
    if mean is None and std is None:
        return None
    c = input_shape[0] if len(input_shape) > 1 else 1
    mean = mean or [0.0]
    std = std or [1.0]
    for vals, what in ((mean, "--mean"), (std, "--std")):
        if len(vals) not in (1, c):
            raise UserInputError(f"{what} has {len(vals)} values but the input has {c} channels")
    if any(s <= 0 for s in std):
        raise UserInputError("--std values must be positive")
    view = (-1,) + (1,) * (len(input_shape) - 1) if len(input_shape) > 1 else (-1,)
    m = torch.tensor(mean, dtype=torch.float32).view(view)
    s = torch.tensor(std, dtype=torch.float32).view(view)
    return Normalize(m, s)


def prepend_normalizer(graph, normalizer: Normalize, shape):
    from lipverify.graph import LipschitzGraph, Node
    from lipverify.graph.linear_ops import Scale

    inv = 1.0 / normalizer.std
    op = Scale(inv.expand(shape).clone(), shape, (-normalizer.mean * inv).expand(shape).clone())
    nodes = [graph.nodes[0], Node("normalize", "linear", [0], tuple(shape), op, ["normalize"])]
    for n in graph.nodes[1:]:
        n.inputs = [j + 1 if j > 0 else 1 for j in n.inputs]
        nodes.append(n)
    return LipschitzGraph(nodes, graph.output + 1, graph.notes)
