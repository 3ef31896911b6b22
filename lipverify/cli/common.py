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
from lipverify.errors import SoundnessViolation, UserInputError
from lipverify.importers.loader import resolve_device

EXIT_INTERNAL, EXIT_USER, EXIT_UNSOUND = 1, 2, 3


def print_error(msg: str) -> None:
    click.echo(f"lipverify: error: {msg}", err=True)


def handle_errors(fn):
    """Map exceptions to exit codes; tracebacks only with --debug or LIPVERIFY_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug") or os.environ.get("LIPVERIFY_DEBUG") == "1"
        try:
            with warnings.catch_warnings():
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
        except KeyboardInterrupt:
            print_error("interrupted")
            sys.exit(130)
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
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


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
    vals = [v.strip() for v in text.split(",")]
    try:
        lo, hi = (float(v) for v in vals) if len(vals) == 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or not lo < hi:
        raise UserInputError(f"--clip must be LO,HI with LO < HI, got {text!r}")
    lm.set_domain(lo, hi)


def clip_option(text, x):
    """``--clip lo,hi``; default (0, 1) when every input lies in [0, 1], else no box."""
    if text is not None:
        if text.lower() == "none":
            return None
        vals = [float(v) for v in text.split(",")]
        if len(vals) != 2 or vals[0] >= vals[1]:
            raise UserInputError(f"--clip must be LO,HI with LO < HI, got {text!r}")
        return tuple(vals)
    if float(x.min()) >= 0.0 and float(x.max()) <= 1.0:
        return (0.0, 1.0)
    return None
