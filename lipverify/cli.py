"""Command-line interface: a thin layer over the Python API.

Exit codes: 0 success; 1 internal error; 2 a problem with the user's input (one line on stderr, no
traceback unless ``--debug``); 3 a soundness violation found by ``audit``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback

import click

from lipverify.errors import SoundnessViolation, UserInputError

EXIT_INTERNAL, EXIT_USER, EXIT_UNSOUND = 1, 2, 3


def _err(msg: str) -> None:
    click.echo(f"lipverify: error: {msg}", err=True)


def handle_errors(fn):
    """Map exceptions to exit codes; tracebacks only with --debug or LIPVERIFY_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug") or os.environ.get("LIPVERIFY_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except UserInputError as exc:
            if debug:
                traceback.print_exc()
            _err(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            sys.exit(EXIT_USER)
        except SoundnessViolation as exc:
            if debug:
                traceback.print_exc()
            _err(f"SOUNDNESS VIOLATION: {exc}")
            sys.exit(EXIT_UNSOUND)
        except KeyboardInterrupt:
            _err("interrupted")
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as exc:  # internal error
            if debug:
                traceback.print_exc()
            _err(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
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


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--device {name}: CUDA is not available on this machine")
    if name not in ("cpu",) and not name.startswith("cuda") and name != "mps":
        raise UserInputError(f"--device must be cpu, cuda, cuda:N, mps or auto, got {name!r}")
    return name


def load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device, fidelity_inputs=None):
    import lipverify

    source = model or lipverify.BUILTIN_DEFAULT
    return lipverify.load(source, input_shape=input_shape, mean=mean, std=std, arch=arch,
                          trust_pickle=trust_pickle, fidelity_check=not no_fidelity_check,
                          fidelity_inputs=fidelity_inputs, device=resolve_device(device))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lipverify")
def main():
    """lipverify: sound Lipschitz bounds, certified radii, attacks and certified fine-tuning for
    classifiers you did not train.  MODEL is an .onnx file, a TorchScript/.pt2 file, a state dict
    (with --arch), or omitted / builtin:default for the embedded MNIST model."""


# ------------------------------------------------------------------------------------------------


@main.command()
@model_options
@click.option("--norm", type=click.Choice(["2", "inf"]), default="2", show_default=True)
@click.option("--method", type=click.Choice(["sound", "power", "lipsdp"]), default="sound", show_default=True,
              help="sound: proven bounds; power: power-iteration estimates; lipsdp: LipSDP-Neuron (dense ReLU nets).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@handle_errors
def bounds(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device, debug, norm, method,
           as_json):
    """Lipschitz bounds: per-layer constants, global bound, margin constants K_ij."""
    t0 = time.perf_counter()
    lm = load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device)
    if method == "lipsdp":
        from lipverify.bounds.lipsdp_graph import lipsdp_report

        report = lipsdp_report(lm, norm)
    else:
        report = lm.bounds(norm=norm, method=method)
    report.time_s = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    from lipverify.report_text import print_bounds

    print_bounds(report)


def _entry():  # pragma: no cover - console script
    main()


if __name__ == "__main__":  # pragma: no cover
    main()
