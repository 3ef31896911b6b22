"""What every command shares: exit codes and error handling, the model and data options, loading the
model and the data for a command.

Exit codes: 0 success; 1 internal error; 2 a problem with the user's input (one line on stderr, no
traceback unless ``--debug``); 3 a soundness violation found by ``audit``.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
import warnings

import click

from lipverify.data import load_for_model
from lipverify.data.atomic import signals_raise
from lipverify.errors import SoundnessViolation, UserInputError
from lipverify.importers.loader import resolve_device
from lipverify.limits import parse_size, set_memory_limit

EXIT_INTERNAL, EXIT_USER, EXIT_UNSOUND = 1, 2, 3


def print_error(msg: str) -> None:
    click.echo(f"lipverify: error: {msg}", err=True)


def handle_errors(fn):
    """Map exceptions to exit codes; tracebacks only with --debug or LIPVERIFY_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug") or os.environ.get("LIPVERIFY_DEBUG") == "1"
        try:
            # SIGTERM / SIGHUP unwind like Ctrl-C, so every temporary file is removed on the way out
            with warnings.catch_warnings(), signals_raise():
                if not debug:  # library warnings (onnx2torch, torch) are noise to the user; --debug shows them
                    warnings.simplefilter("ignore")
                return fn(*args, **kwargs)
        except UserInputError as exc:
            if debug:
                traceback.print_exc()
            print_error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            sys.exit(EXIT_USER)
        except SoundnessViolation as exc:
            if debug:
                traceback.print_exc()
            print_error(f"SOUNDNESS VIOLATION: {exc}")
            sys.exit(EXIT_UNSOUND)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", 2)
            print_error("interrupted" if signum == 2 else f"stopped by signal {signum}")
            sys.exit(128 + signum)
        except MemoryError:
            if debug:
                traceback.print_exc()
            print_error("out of memory: lower --batch-size or --limit, or give the process more memory "
                        "(see --max-memory)")
            sys.exit(EXIT_USER)
        except click.exceptions.Exit:
            raise
        except Exception as exc:  # internal error
            if debug:
                traceback.print_exc()
            print_error(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                 "(rerun with --debug for a traceback)")
            sys.exit(EXIT_INTERNAL)

    return wrapper


def model_options(fn):
    """Options shared by every command that loads a model."""
    opts = [
        click.argument("model", required=False, default=None),
        click.option("--input-shape", default=None, help="Per-example input shape, e.g. 1,28,28 (torch models)."),
        click.option("--mean", default=None, help="Normalisation outside the model: per-channel mean, comma-separated."),
        click.option("--std", default=None, help="Normalisation outside the model: per-channel std (one value broadcasts)."),
        click.option("--arch", default=None, help="FILE.py:CALLABLE or module:CALLABLE building the network for a state dict."),
        click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled module (it can run code)."),
        click.option("--no-fidelity-check", is_flag=True, help="Skip the onnxruntime comparison of ONNX imports."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--debug", is_flag=True, help="Show Python tracebacks."),
        MAX_MEMORY_OPTION,
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _max_memory(ctx, param, value):
    try:
        set_memory_limit(None if value is None else parse_size(value))
    except UserInputError as exc:
        raise click.BadParameter(str(exc)) from None


#: ``--max-memory``: the limit every size check compares with (lipverify.limits); set for the whole command
MAX_MEMORY_OPTION = click.option(
    "--max-memory", default=None, expose_value=False, is_eager=True, callback=_max_memory,
    help="Refuse inputs whose arrays would need more memory than this, e.g. 8G (default: "
         "LIPVERIFY_MAX_MEMORY, else 80% of the available memory).")


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and inf (and, with ``positive``, values <= 0)."""

    name = "number"

    def __init__(self, positive: bool = False, nonnegative: bool = False):
        self.positive, self.nonnegative = positive, nonnegative

    def convert(self, value, param, ctx):
        import math

        if isinstance(value, float) and math.isfinite(value):
            v = value
        else:
            try:
                v = float(value)
            except (TypeError, ValueError, OverflowError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.positive and not v > 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        if self.nonnegative and not v >= 0:
            self.fail(f"{value!r} must be >= 0", param, ctx)
        return v


FINITE = FiniteFloat()
NONNEGATIVE = FiniteFloat(nonnegative=True)
POSITIVE = FiniteFloat(positive=True)


def check_outputs(inputs: tuple, files: dict | None = None, folders: dict | None = None) -> None:
    """Check every output location before the work (:func:`lipverify.data.atomic.check_output`):
    ``files``/``folders`` map an option name to its value (None: not given).  Two outputs at one
    path are refused too."""
    from lipverify.data.atomic import check_output

    seen: dict = {}
    for kind, given in (("file", files or {}), ("folder", folders or {})):
        for option, value in given.items():
            if value is None:
                continue
            p = check_output(value, *inputs, folder=kind == "folder", option=option)
            key = os.path.abspath(p)
            if key in seen:
                raise UserInputError(f"{option} and {seen[key]} name the same path", str(value))
            seen[key] = option


def load_dataset(lm, data_path, layout, limit, mean, std, need_labels=False):
    """The command's ``--data`` for ``lm`` (see :func:`lipverify.data.load_for_model`)."""
    return load_for_model(lm, data_path, layout=layout, limit=limit, outside_normalisation=mean is not None or
                          std is not None, need_labels=need_labels)


def load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device, fidelity_inputs=None):
    import lipverify

    source = model or lipverify.BUILTIN_DEFAULT
    return lipverify.load(source, input_shape=input_shape, mean=mean, std=std, arch=arch,
                          trust_pickle=trust_pickle, fidelity_check=not no_fidelity_check,
                          fidelity_inputs=fidelity_inputs, device=resolve_device(device))


def data_options(fn):
    opts = [
        click.option("--data", "data_path", required=True, help=".npz (x, y), a folder of class sub-folders, or VNN-LIB file(s)."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True,
                     help="Channel order of the data file."),
        click.option("--limit", type=int, default=None, help="Use only the first N examples."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Examples per batch (default: certify picks one from the free memory of the device; "
                          "256 elsewhere)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def domain_option(lm, text) -> None:
    """``--clip LO,HI`` for commands without data to read it from: the input domain the bounds of
    products and normalisations hold on (default [0, 1])."""
    if text is None:
        return
    lm.set_domain(*_parse_clip(text))


def _parse_clip(text: str) -> tuple[float, float]:
    """``LO,HI`` with finite LO < HI (exit 2 otherwise)."""
    import math

    vals = [v.strip() for v in str(text).split(",")]
    try:
        lo, hi = (float(v) for v in vals) if len(vals) == 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UserInputError(f"--clip must be LO,HI with finite LO < HI, got {text!r}")
    return lo, hi


def clip_option(text, x):
    """``--clip lo,hi``; default (0, 1) when every input lies in [0, 1], else no box."""
    if text is not None:
        if text.lower() == "none":
            return None
        return _parse_clip(text)
    if float(x.min()) >= 0.0 and float(x.max()) <= 1.0:
        return (0.0, 1.0)
    return None


def require_decision(lm, command: str) -> None:
    """Refuse a model with fewer than two outputs: there is no decision between classes to certify,
    attack or train (``bounds`` still works on it)."""
    if lm.n_classes < 2:
        raise UserInputError(f"the model has {lm.n_classes} output; {command} needs a classifier with at least two "
                             "logits (use 'lipverify bounds' for the Lipschitz constant of a scalar function)", lm.name)


def accuracy_warning(accuracy: float, n: int, n_classes: int) -> str | None:
    """A warning when the clean accuracy is no better than guessing (at least 10 inputs): the data,
    its labels, its layout or its normalisation probably do not match the model."""
    if n < 10 or n_classes < 2 or accuracy is None:
        return None
    chance = 1.0 / n_classes
    if accuracy <= chance:
        return (f"clean accuracy {accuracy:.3f} is no better than chance ({chance:.3f} for {n_classes} classes): do the "
                "data, labels, --layout and --mean/--std match the model? Radii of misclassified inputs certify the "
                "wrong class")
    return None


def warn(msg: str | None) -> None:
    if msg:
        click.echo(f"lipverify: warning: {msg}", err=True)
