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

from lipverify.arguments import parse_box
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


def load_dataset(lm, data_path, layout, limit, mean, std, need_labels=False, *, clip=None, batch_size=None,
                 allow_low_accuracy=None):
    """The command's ``--data`` for ``lm`` (see :func:`lipverify.data.load_for_model`), checked against
    the model it is to judge (:func:`lipverify.data.sanity.check_for_model`; for audit, certify and
    attack, never for training data).

    ``.npz`` inputs that are whole numbers in [0, 255] are divided by 255, as image folders are (a note
    says so; ``--clip`` above 1 or ``--mean`` above 1 keeps them as stored).  Inputs outside the
    ``--clip`` box (default [0, 1]) and a clean accuracy under 0.5 give one warning line each on
    stderr (also kept in ``ds.notes``).  ``clip``, ``batch_size`` and ``allow_low_accuracy`` default
    to the command's ``--clip``, ``--batch-size`` and ``--allow-low-accuracy``.

    Warnings
    --------
    Raises :class:`~lipverify.errors.UserInputError` (exit 2) for labels outside the model's classes
    (naming the label range and the class count) and for a clean accuracy at or below chance, unless
    ``--allow-low-accuracy``.
    """
    from pathlib import Path

    import torch

    from lipverify.data import load_data
    from lipverify.data.sanity import check_for_model
    from lipverify.importers.normalize import parse_floats

    ctx = click.get_current_context(silent=True)
    params = ctx.params if ctx is not None else {}
    clip = params.get("clip") if clip is None else clip
    batch_size = params.get("batch_size") if batch_size is None else batch_size
    if allow_low_accuracy is None:
        allow_low_accuracy = bool(ctx.meta.get("lipverify.allow_low_accuracy")) if ctx is not None else False
    outside = mean is not None or std is not None
    p = Path(data_path)
    if p.name.lower().endswith(".npz") and not p.is_dir():
        # labels are checked against the model below, with their range and the class count
        ds = load_data(p, lm.input_shape, layout=layout, limit=limit)
    else:
        ds = load_for_model(lm, data_path, layout=layout, limit=limit, outside_normalisation=outside,
                            need_labels=need_labels)
    box = None if clip is None or str(clip).lower() == "none" else parse_box(clip)
    for msg in check_for_model(lm, ds, str(data_path), layout=layout, clip=box, clip_given=clip is not None,
                               mean=parse_floats(mean, "--mean"), normalised_outside=outside,
                               batch_size=batch_size, allowed=allow_low_accuracy):
        ds.notes.append(msg)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_rank() != 0):  # under torchrun: said once, by rank 0
            warn(msg)
    return ds


def load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device, fidelity_inputs=None):
    import lipverify

    source = model or lipverify.BUILTIN_DEFAULT
    return lipverify.load(source, input_shape=input_shape, mean=mean, std=std, arch=arch,
                          trust_pickle=trust_pickle, fidelity_check=not no_fidelity_check,
                          fidelity_inputs=fidelity_inputs, device=resolve_device(device))


def data_options(fn=None, *, default_limit: int | None = None):
    """The data options; ``default_limit``: the inputs used when ``--limit`` is not given (shown in --help)."""
    if fn is None:
        return lambda f: data_options(f, default_limit=default_limit)
    limit_help = ("Use only the first N examples" + (f" [default: {default_limit}]." if default_limit else " (default: all)."))
    opts = [
        click.option("--data", "data_path", required=True, help=".npz (x, y), a folder of class sub-folders, or VNN-LIB file(s)."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True,
                     help="Channel order of the data file."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help=limit_help),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Examples per batch (default: certify picks one from the free memory of the device; "
                          "256 elsewhere)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option("--allow-low-accuracy", is_flag=True, expose_value=False,
                     callback=lambda ctx, param, value: ctx.meta.__setitem__("lipverify.allow_low_accuracy", value),
                     help="Run even when the model's clean accuracy on --data is at or below chance (by default "
                          "that stops with exit 2 and the likely causes: missing --mean/--std, 0..255 data, "
                          "--layout, label order)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def domain_option(lm, text) -> None:
    """``--clip LO,HI`` for commands without data to read it from: the input domain the bounds of
    products and normalisations hold on (default [0, 1])."""
    if text is None:
        return
    lm.set_domain(*parse_box(text))


def clip_option(text, x):
    """``--clip LO,HI`` of ``attack`` and ``audit``: the box perturbed inputs must stay in.  Not given:
    ``[0, 1]`` when every input lies in it, else no box; ``none``: no box
    (:func:`lipverify.arguments.resolve_box`, the same rule as ``LipModel.attack(clip="auto")``)."""
    from lipverify.arguments import resolve_box

    return resolve_box("auto" if text is None else text, x)


class NormType(click.ParamType):
    """``--norm``: every spelling :func:`lipverify.arguments.parse_norm` accepts (2, l2, L2, inf, linf,
    Linf, l_inf, ...), converted to ``"2"`` or ``"inf"``."""

    name = "norm"

    def convert(self, value, param, ctx):
        from lipverify.arguments import parse_norm

        try:
            return parse_norm(value)
        except UserInputError as exc:
            self.fail(str(exc), param, ctx)


def norm_option(default: str = "2"):
    """The ``--norm`` option (:class:`NormType`) with ``default``."""
    from lipverify.arguments import norm_help

    return click.option("--norm", type=NormType(), default=default, show_default=True,
                        help=f"Norm of the perturbations: {norm_help()}.")


def require_decision(lm, command: str) -> None:
    """Refuse a model with fewer than two outputs: there is no decision between classes to certify,
    attack or train (``bounds`` still works on it)."""
    if lm.n_classes < 2:
        raise UserInputError(f"the model has {lm.n_classes} output; {command} needs a classifier with at least two "
                             "logits (use 'lipverify bounds' for the Lipschitz constant of a scalar function)", lm.name)


def warn(msg: str | None) -> None:
    if msg:
        click.echo(f"lipverify: warning: {msg}", err=True)
