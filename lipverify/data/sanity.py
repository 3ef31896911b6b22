"""Say it when the numbers are nonsense: checks of evaluation data against the model that judges it.

A model audited on data it was not trained for (pixels in 0..255 for a model of [0, 1] pixels,
normalised data for a model that normalises itself, missing ``--mean/--std``, channel-last images read
channel-first, labels of another class order) produces radii and accuracies that look like numbers
and mean nothing.  These pure functions spot the symptoms that are visible before the analysis: the
range of the inputs, the range of the labels and the clean accuracy of the model on them.
:func:`lipverify.cli.common.load_dataset` applies them for the commands that judge a trained model
(``audit``, ``certify``, ``attack``); training data is not checked.

The rules
---------
* **0..255 pixels in an .npz** (:func:`byte_pixels`, :func:`byte_scaling`): when every input is a
  whole number in ``[0, 255]`` and the largest exceeds 1, the inputs are divided by 255, as image
  folders are, with a note saying so.  They are kept as stored when the user declared the model's
  inputs to be 0..255: a ``--clip`` box reaching above 1 (``--clip 0,255``), or a ``--mean`` above 1
  (a normalisation in 0..255 units).  Nothing else about a model's expected input range is knowable
  from the file.
* **Inputs outside the input domain** (:func:`domain_warning`): the domain is the ``--clip`` box, or
  ``[0, 1]`` without one (``--clip none``: no domain, no check).  One warning line names the observed
  range and the likely cause: normalised data (with ``--mean/--std``: normalised twice), 0..255 data,
  or other units.
* **Labels outside** ``0..n_classes-1`` (:func:`check_label_range`): a
  :class:`~lipverify.errors.UserInputError` (exit 2) naming the file, the label range and the model's
  class count.
* **Clean accuracy** (:func:`accuracy_verdict`), measured by one batched float32 forward pass
  (:func:`predictions`) on at most the first ``MAX_CHECK_INPUTS`` inputs, and only with at least
  ``MIN_INPUTS`` of them: at or below chance (``<= 1/n_classes``) it is an error (exit 2) unless the
  user allows it (``--allow-low-accuracy``); above chance but under ``LOW_ACCURACY`` (0.5) it is a
  warning.  Both name the likely causes, ordered by :func:`likely_causes`.

Warnings
--------
Heuristics, not proofs: a model whose inputs really are whole numbers up to 255 needs ``--clip 0,255``
(else its data is divided by 255); a weak model (e.g. certifiably trained at a large radius) may be
warned about below 0.5 accuracy; the accuracy check sees only the first ``MAX_CHECK_INPUTS`` inputs.
VNN-LIB boxes are in the model's own units and are not checked here.
"""

from __future__ import annotations

import math

import torch

from lipverify.errors import UserInputError

#: fewest inputs for an accuracy verdict (fewer say nothing about chance)
MIN_INPUTS = 10
#: accuracy under which a warning is given (above chance; at or below chance is an error)
LOW_ACCURACY = 0.5
#: most inputs the accuracy check runs the model on
MAX_CHECK_INPUTS = 1000
#: the note for scaled 0..255 inputs: the words image folders use, and how to keep the values
SCALED_NOTE = ("inputs are whole numbers in [0, 255]: pixels scaled to [0, 1] (divided by 255), as for image "
               "folders; --clip 0,255 keeps them as stored")
_ROWS = 1024  # rows per chunk when scanning inputs (no full-size temporary)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _outward(v: float, up: bool) -> str:
    """``v`` to 4 significant digits, rounded away from the data (a --clip suggestion must hold it)."""
    r = float(f"{v:.4g}")
    if (up and r < v) or (not up and r > v):
        step = 10.0 ** (math.floor(math.log10(abs(v))) - 3)
        r = r + step if up else r - step
    return f"{r:.6g}"


def value_range(x: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of the inputs."""
    return float(x.min()), float(x.max())


def byte_pixels(x: torch.Tensor) -> bool:
    """True when every input is a whole number in ``[0, 255]`` and the largest exceeds 1: 8-bit
    pixels stored as they are (uint8, or integral floats)."""
    if x.numel() == 0:
        return False
    lo, hi = value_range(x)
    if not (lo >= 0 and 1 < hi <= 255):
        return False
    flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    for i in range(0, flat.shape[0], _ROWS):
        part = flat[i:i + _ROWS]
        if not torch.equal(part, torch.round(part)):
            return False
    return True


def byte_scaling(x: torch.Tensor, *, clip: tuple[float, float] | None = None,
                 mean: list[float] | None = None) -> tuple[bool, str | None]:
    """Whether to divide 0..255 inputs by 255, and the note that says what was done.

    ``clip``: the ``--clip`` box the user gave (None: not given); ``mean``: the ``--mean`` values.
    Returns ``(False, None)`` unless :func:`byte_pixels`; ``(False, note)`` when the user declared
    0..255 inputs (a clip box reaching above 1, or a mean above 1); else ``(True, SCALED_NOTE)``.
    """
    if not byte_pixels(x):
        return False, None
    if clip is not None and float(clip[1]) > 1:
        return False, (f"inputs are whole numbers in [0, 255], kept as stored: --clip {float(clip[0]):g},"
                       f"{float(clip[1]):g} declares inputs above 1")
    if mean and max(float(m) for m in mean) > 1:
        return False, "inputs are whole numbers in [0, 255], kept as stored: --mean is in 0..255 units"
    return True, SCALED_NOTE


def domain_warning(lo: float, hi: float, domain: tuple[float, float] | None, source: str, *,
                   clip_given: bool = False, normalised_outside: bool = False) -> str | None:
    """One line when the inputs' range ``[lo, hi]`` leaves ``domain`` (the ``--clip`` box when
    ``clip_given``, else the default ``[0, 1]``); None inside it or without a domain.  The line names
    ``source``, the observed range and the likely cause."""
    if domain is None:
        return None
    d_lo, d_hi = float(domain[0]), float(domain[1])
    if lo >= d_lo and hi <= d_hi:
        return None
    where = (f"outside the --clip box [{d_lo:g}, {d_hi:g}]" if clip_given
             else "outside [0, 1], the default input domain")
    head = (f"{source}: inputs range over [{_fmt(lo)}, {_fmt(hi)}], {where}: bounds and certificates hold "
            "inside it only")
    if lo < 0 and normalised_outside:
        cause = "the data look normalised already and --mean/--std normalise them again: drop --mean/--std"
    elif lo < 0:
        cause = ("the data look normalised: store pixels in [0, 1] and give the normalisation as --mean/--std, "
                 f"or pass --clip {_outward(lo, False)},{_outward(hi, True)} if the model takes them as they are")
    elif hi <= 255 and hi > 1:
        cause = "the data look like 0..255 pixels: divide them by 255, or pass --clip 0,255 if the model takes them"
    else:
        cause = "the data are in other units than the domain: rescale them, or pass --clip LO,HI with their range"
    if clip_given and lo >= 0 and hi <= 1:
        cause = "widen --clip to the data's range, or check that the data are in the model's units"
    return f"{head}; likely cause: {cause}"


def check_label_range(y: torch.Tensor, n_classes: int, source: str) -> None:
    """Raise :class:`~lipverify.errors.UserInputError` (exit 2) naming ``source``, the label range and
    the class count when a label lies outside ``0..n_classes-1``."""
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo >= 0 and hi < n_classes:
        return
    out = int(((y < 0) | (y >= n_classes)).sum())
    hint = "do the labels follow the model's class order?"
    if lo >= 1 and hi == n_classes:
        hint = "1-based labels? subtract 1"
    elif lo >= n_classes:
        hint = "labels of another data set or offset labels?"
    raise UserInputError(
        f"labels range over {lo}..{hi} but the model has {n_classes} classes (labels 0..{n_classes - 1}): "
        f"{out} of {y.numel()} label(s) outside; {hint}", path=source)


@torch.no_grad()
def predictions(model, x: torch.Tensor, batch_size: int = 256, device=None) -> torch.Tensor:
    """The predicted class of each input: one forward pass of ``model`` (a callable giving logits
    ``(B, ...)``) in batches of ``batch_size``, on ``device`` (None: where ``x`` is).  int64, on CPU."""
    out = []
    bs = max(1, int(batch_size))
    for i in range(0, x.shape[0], bs):
        xb = x[i:i + bs]
        if device is not None:
            xb = xb.to(device)
        logits = model(xb)
        out.append(logits.reshape(logits.shape[0], -1).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def likely_causes(*, lo: float, hi: float, normalised_outside: bool, scaled_bytes: bool = False,
                  channels: int | None = None, layout: str = "nchw", reshaped: bool = False) -> list[str]:
    """Why a model might score at chance on its data, most likely first, from what is knowable: the
    inputs' range ``[lo, hi]`` (after any scaling), whether ``--mean/--std`` were given, whether 0..255
    inputs were divided by 255, the model's channel count (images ``(C, H, W)``; None otherwise), the
    ``--layout`` and whether the file's arrays were reshaped to the model's shape."""
    causes = []
    if lo < 0 and normalised_outside:
        causes.append("data normalised twice (the file looks normalised already: drop --mean/--std)")
    elif hi > 1 and hi <= 255 and lo >= 0:
        causes.append("data in 0..255 (divide by 255)")
    if scaled_bytes:
        causes.append("the file's 0..255 values were divided by 255 (if the model takes 0..255 pixels, pass "
                      "--clip 0,255)")
    other = "nhwc" if layout == "nchw" else "nchw"
    layout_cause = (f"channel layout (the file may be channel-{'last' if layout == 'nchw' else 'first'}: "
                    f"try --layout {other})")
    has_layout = channels is not None and channels > 1
    if has_layout and reshaped:
        causes.append(layout_cause)
    if not normalised_outside and lo >= 0 and hi <= 1:
        causes.append("missing --mean/--std (the model may expect normalised inputs)")
    if has_layout and not reshaped:
        causes.append(layout_cause)
    causes.append("labels in another class order than the model's outputs")
    return causes


def accuracy_verdict(correct: int, n: int, n_classes: int, source: str, causes: list[str], *,
                     total: int | None = None, allowed: bool = False) -> tuple[str | None, str | None]:
    """``(kind, message)`` for ``correct`` of ``n`` inputs right (the first ``n`` of ``total``).

    ``("error", ...)`` at or below chance (``correct/n <= 1/n_classes``; with ``allowed``, i.e.
    ``--allow-low-accuracy``, a ``"warning"`` instead); ``("warning", ...)`` above chance but under
    ``LOW_ACCURACY``; else ``(None, None)``, as with fewer than ``MIN_INPUTS`` inputs or fewer than two
    classes.  The message is one line starting with ``source``, naming the accuracy, chance and the
    numbered ``causes``.
    """
    if n < MIN_INPUTS or n_classes < 2:
        return None, None
    acc = correct / n
    chance = 1.0 / n_classes
    of = f" on the first {n} of {total} inputs" if total is not None and total > n else ""
    listed = "; ".join(f"({i}) {c}" for i, c in enumerate(causes, 1))
    if acc <= chance or math.isclose(acc, chance):
        msg = (f"{source}: clean accuracy {acc:.4f} ({correct} of {n}){of} is at or below chance ({chance:.4f} for "
               f"{n_classes} classes): the data do not match the model; likely causes: {listed}")
        if allowed:
            return "warning", msg + " (running anyway: --allow-low-accuracy)"
        return "error", msg + "; --allow-low-accuracy runs anyway"
    if acc < LOW_ACCURACY:
        return "warning", (f"{source}: clean accuracy {acc:.4f} ({correct} of {n}){of} is low (chance "
                           f"{chance:.4f}; warned under {LOW_ACCURACY:g}): if unexpected for this model, check "
                           f"{listed}")
    return None, None


def check_for_model(lm, ds, source: str, *, layout: str = "nchw", clip: tuple[float, float] | None = None,
                    clip_given: bool = False, mean: list[float] | None = None, normalised_outside: bool = False,
                    batch_size: int | None = None, allowed: bool = False) -> list[str]:
    """Apply the rules of the module docstring to ``ds``, loaded for the model ``lm`` from ``source``.

    ``clip``/``clip_given``: the ``--clip`` box and whether one was given (given as None: ``--clip
    none``, no domain); ``mean``: the ``--mean`` values; ``normalised_outside``: ``--mean/--std`` given;
    ``batch_size``: of the forward pass (None: 256); ``allowed``: ``--allow-low-accuracy``.  Divides
    0..255 ``.npz`` inputs by 255 in place (replacing the loader's note on their dtype with the note of
    what was done).  Returns the warnings, one line each.  VNN-LIB data are left alone.

    Warnings
    --------
    Raises :class:`~lipverify.errors.UserInputError` for labels outside the model's classes and for a
    clean accuracy at or below chance (unless ``allowed``).
    """
    if ds.eps is not None or ds.lower is not None or len(ds) == 0:
        return []
    out: list[str] = []
    if ds.labelled:
        check_label_range(ds.y, lm.n_classes, source)
    scaled = False
    if str(ds.source).lower().endswith(".npz"):
        scale, note = byte_scaling(ds.x, clip=clip if clip_given else None, mean=mean)
        if note:
            ds.notes = [n for n in ds.notes if not str(n).startswith("inputs are stored as ")] + [note]
        if scale:
            ds.x.div_(255.0)
            scaled = True
    lo, hi = value_range(ds.x)
    msg = domain_warning(lo, hi, clip if clip_given else (0.0, 1.0), source, clip_given=clip_given,
                         normalised_outside=normalised_outside)
    if msg:
        out.append(msg)
    if ds.labelled and len(ds) >= MIN_INPUTS:
        m = min(len(ds), MAX_CHECK_INPUTS)
        pred = predictions(lm, ds.x[:m], batch_size or 256)
        correct = int((pred == ds.y[:m].cpu()).sum())
        shape = tuple(lm.input_shape)
        causes = likely_causes(lo=lo, hi=hi, normalised_outside=normalised_outside, scaled_bytes=scaled,
                               channels=shape[0] if len(shape) == 3 else None, layout=layout,
                               reshaped=any(str(n).startswith("reshaped") for n in ds.notes))
        kind, msg = accuracy_verdict(correct, m, lm.n_classes, source, causes, total=len(ds), allowed=allowed)
        if kind == "error":
            raise UserInputError(msg)
        if msg:
            out.append(msg)
    return out
