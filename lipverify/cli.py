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


def progress_bar(total: int, label: str, quiet: bool):
    """A rich progress bar on stderr; silent when stderr is not a terminal or with --quiet."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        @contextlib.contextmanager
        def dummy():
            yield lambda k=1: None
        return dummy()

    @contextlib.contextmanager
    def bar():
        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as prog:
            task = prog.add_task(label, total=total)
            yield lambda k=1: prog.advance(task, k)
    return bar()


def data_options(fn):
    opts = [
        click.option("--data", "data_path", required=True, help=".npz (x, y), a folder of class sub-folders, or VNN-LIB file(s)."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True,
                     help="Channel order of the data file."),
        click.option("--limit", type=int, default=None, help="Use only the first N examples."),
        click.option("--batch-size", type=int, default=256, show_default=True),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def load_dataset(lm, data_path, layout, limit, mean, std):
    """Load data for ``lm``; VNN-LIB boxes (model-input units) are mapped to pixel space when the
    normalisation is outside the model."""
    from lipverify.data import load_data

    ds = load_data(data_path, lm.input_shape, layout=layout, n_classes=lm.n_classes, limit=limit)
    if ds.eps is not None and (mean is not None or std is not None):
        norm = lm.module.normalize
        x = ds.x * norm.std + norm.mean
        # the box of half-width eps_c per channel in model units is eps_c*std_c in pixels: the l-inf
        # ball of radius max(eps*std) contains it, so certifying that ball certifies the box.
        ds.x = x
        ds.eps = ds.eps * float(norm.std.max())
        ds.notes.append("VNN-LIB boxes mapped to pixel space (x*std+mean; eps*max(std), a superset ball)")
    return ds


@main.command()
@model_options
@data_options
@click.option("--eps", default=None, help="Radius or list: 0.3 | 36/255,72/255 (default: VNN-LIB eps, else none).")
@click.option("--norm", type=click.Choice(["2", "inf"]), default="2", show_default=True)
@click.option("--method", type=click.Choice(["global", "local"]), default="global", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--out", "out_csv", default=None, help="Per-input CSV file.")
@click.option("--plot", "plot_png", default=None, help="PNG: certified accuracy vs eps and radius histogram.")
@handle_errors
def certify(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device, debug, data_path, layout,
            limit, batch_size, quiet, eps, norm, method, as_json, out_csv, plot_png):
    """Certified radius per input (global GloRo rule, or IBP-masked local bounds)."""
    from lipverify.certify import parse_eps
    from lipverify.io_utils import check_not_input

    for out in (out_csv, plot_png):
        if out:
            check_not_input(out, model, data_path)
    lm = load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device)
    ds = load_dataset(lm, data_path, layout, limit, mean, std)
    eps_list = parse_eps(eps)
    eps_arg = eps_list if eps_list or ds.eps is None else ds.eps
    if ds.eps is not None and not eps_list and norm != "inf":
        raise UserInputError("VNN-LIB specifications are l-inf boxes: use --norm inf (or give --eps)", data_path)
    with progress_bar(len(ds), "certifying", quiet) as advance:
        res = lm.certify(ds.x, ds.y, eps=eps_arg, norm=norm, method=method, batch_size=batch_size,
                         progress=advance, names=ds.names)
    res.notes = list(lm.notes) + list(ds.notes) + res.notes
    _write_certify_outputs(res, out_csv, plot_png)
    if as_json:
        d = res.to_dict()
        d["model"] = lm.name
        click.echo(json.dumps(d))
        return
    from lipverify.report_text import print_certify

    print_certify(res, lm.name)


def _write_certify_outputs(res, out_csv, plot_png):
    import csv
    import io

    import numpy as np

    from lipverify.io_utils import atomic_write_bytes, atomic_write_text

    if out_csv:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["index", "label", "pred", "margin", "radius", "certified", "method", "sound"])
        for c in res.inputs:
            w.writerow([c.index, c.label, c.pred, f"{c.margin:.9g}", f"{c.radius:.9g}", int(c.certified), c.method,
                        int(c.sound)])
        atomic_write_text(out_csv, buf.getvalue())
    if plot_png:
        from lipverify.plots import certify_plot

        radii = np.array([c.radius if c.sound else 0.0 for c in res.inputs])
        correct = np.array([c.label == c.pred for c in res.inputs])
        atomic_write_bytes(plot_png, certify_plot(radii, correct, res.norm, res.eps))



def _clip_option(text, x):
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


def _attack_box(lm, ds, clip, mean, std):
    """The input domain of the attack: the exact VNN-LIB box (mapped to pixel space) or ``--clip``.

    A VNN-LIB box is rounded *inwards* to float32 numbers, so that every float32 point the attack
    returns lies in the specification's float64 box as it is."""
    if ds.lower is not None and ds.upper is not None:
        from lipverify.counterexamples import float32_box

        lo, hi = ds.lower, ds.upper
        norm = getattr(lm.module, "normalize", None)
        if norm is not None and (mean is not None or std is not None):
            lo = ds.lower * norm.std.double().cpu() + norm.mean.double().cpu()
            hi = ds.upper * norm.std.double().cpu() + norm.mean.double().cpu()
        lo, hi = float32_box(lo, hi)
        return (lo.to(lm.device), hi.to(lm.device)), True
    return _clip_option(clip, ds.x), False


@main.command()
@model_options
@data_options
@click.option("--eps", default=None, help="Radius or list for the robust accuracy, e.g. 0.3 or 8/255,16/255.")
@click.option("--norm", type=click.Choice(["2", "inf"]), default="2", show_default=True)
@click.option("--clip", default=None, help="Input domain LO,HI (default 0,1 when the data lies in [0,1]; 'none').")
@click.option("--strength", type=click.Choice(["fast", "standard", "thorough"]), default="standard",
              show_default=True, help="Attack effort (standard: sized like AutoAttack's standard version).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", "out_csv", default=None, help="Per-input CSV (index, label, pred, r_adv, found_by, broken at each eps).")
@click.option("--save", "save_npz", default=None,
              help="adv.npz with every adversarial point, label, prediction, radius (and VNN-LIB counterexample files).")
@handle_errors
def attack(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device, debug, data_path, layout,
           limit, batch_size, quiet, eps, norm, clip, strength, seed, as_json, out_csv, save_npz):
    """Empirical robustness: an adversarial radius per input and the robust accuracy per eps."""
    from lipverify.certify import parse_eps
    from lipverify.io_utils import check_not_input

    for out in (out_csv, save_npz):
        if out:
            check_not_input(out, model, data_path)
    lm = load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device)
    ds = load_dataset(lm, data_path, layout, limit, mean, std)
    eps_list = sorted(set(parse_eps(eps)))
    box, exact_box = _attack_box(lm, ds, clip, mean, std)
    if exact_box and norm != "inf":
        raise UserInputError("VNN-LIB specifications are l-inf boxes: use --norm inf", data_path)
    n_stages = 1 + len(eps_list)
    with progress_bar(len(ds) * n_stages, "attacking", quiet) as advance:
        rep = lm.attack(ds.x, ds.y, eps=eps_list, norm=norm, clip=box, strength=strength, batch_size=batch_size,
                        seed=seed, progress=advance, names=ds.names)
    rep.notes = list(lm.notes) + list(ds.notes) + rep.notes
    if exact_box:
        rep.notes.append("attacked inside each VNN-LIB box (the exact input set of the specification)")
    _write_attack_outputs(rep, lm, ds, out_csv, save_npz, exact_box)
    out = rep.to_dict()
    out["model"] = lm.name
    if exact_box:
        out["clip"] = "VNN-LIB box"
        out["counterexamples_found"] = int((rep.radius < float("inf")).sum())
    if as_json:
        click.echo(json.dumps(out, default=str))
        return
    from lipverify.report_text import print_attack

    print_attack(out, exact_box)


def _write_attack_outputs(rep, lm, ds, out_csv, save_npz, exact_box):
    import numpy as np

    from lipverify.io_utils import atomic_write_bytes, atomic_write_text

    if out_csv:
        keys = [f"{e:.6g}" for e in rep.eps]
        lines = ["index,label,pred,r_adv,found_by" + "".join(f",broken@{k}" for k in keys)]
        for c in rep.inputs():
            r = c["r_adv"] if isinstance(c["r_adv"], str) else f"{c['r_adv']:.9g}"
            lines.append(f"{c['index']},{c['label']},{c['pred']},{r},{c['found_by']}"
                         + "".join(f",{int(c['broken'][k])}" for k in keys))
        atomic_write_text(out_csv, "\n".join(lines) + "\n")
    if save_npz:
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, x_adv=rep.x_adv.numpy(), x=ds.x.numpy(), label=rep.labels.numpy(),
                            pred=rep.pred.numpy(), radius=rep.radius.numpy(), margin=rep.margin.numpy(),
                            found_by=np.array(rep.found_by), norm=np.array(rep.norm), eps=np.array(rep.eps),
                            names=np.array(ds.names))
        atomic_write_bytes(save_npz, buf.getvalue())
        if exact_box:
            from lipverify.counterexamples import write_counterexamples

            write_counterexamples(save_npz, lm, ds, rep)


@main.command()
@model_options
@data_options
@click.option("--eps", default=None, help="Radii to report (default: a few fractions of the median adversarial radius).")
@click.option("--norm", type=click.Choice(["2", "inf"]), default="2", show_default=True)
@click.option("--clip", default=None, help="Input domain LO,HI (default 0,1 when the data lies in [0,1]; 'none').")
@click.option("--out", "out_dir", default="lipverify-audit", show_default=True, help="Output folder for the report.")
@click.option("--strength", type=click.Choice(["fast", "standard", "thorough"]), default="standard",
              show_default=True, help="Attack effort for the adversarial radii.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def audit(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device, debug, data_path, layout,
          limit, batch_size, quiet, eps, norm, clip, out_dir, strength, seed):
    """Two-sided report: sound bounds and certificates next to lower bounds and attacks."""
    from pathlib import Path

    from lipverify.audit import run_audit
    from lipverify.certify import parse_eps
    from lipverify.errors import SoundnessViolation
    from lipverify.io_utils import atomic_write_bytes, check_not_input
    from lipverify.report_audit import render

    out = Path(out_dir)
    for name in ("report.md", "report.html", "report.json"):
        check_not_input(out / name, model, data_path)
    lm = load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device)
    ds = load_dataset(lm, data_path, layout, limit if limit is not None else 200, mean, std)
    eps_list = sorted(set(parse_eps(eps)))
    box = _clip_option(clip, ds.x)
    from rich.console import Console

    err = Console(stderr=True)
    show = (lambda msg: err.print(f"[dim]audit: {msg}...[/dim]")) if (not quiet and err.is_terminal) else None
    if not eps_list:
        eps_list = [0.1, 0.3, 1.0] if norm == "2" else [1 / 255, 2 / 255, 8 / 255]
    res = run_audit(lm, ds.x, ds.y, eps_list, norm=norm, clip=box, seed=seed, strength=strength, progress=show)
    res.notes = res.notes + ds.notes
    files = render(res)
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    con = Console()
    if res.violations:
        con.print(f"[bold red]SOUNDNESS VIOLATION on {len(res.violations)} input(s)[/bold red]")
    con.print(f"[bold]lipverify audit[/bold]  model {lm.name}  norm l{norm}  inputs {res.n}")
    for v in res.verdict:
        con.print(f"- {v}")
    con.print(f"report: {out / 'report.html'} (also report.md, report.json)   time {res.time_s:.1f} s")
    if res.violations:
        raise SoundnessViolation(f"{len(res.violations)} certified input(s) broken by an attack; see {out}")


def _register_optional_commands():
    """Commands that live in their own modules (fine-tuning)."""
    try:
        from lipverify.train.command import finetune
    except ImportError:  # pragma: no cover - module not present
        return
    main.add_command(finetune)


_register_optional_commands()


def _entry():  # pragma: no cover - console script
    main()


if __name__ == "__main__":  # pragma: no cover
    main()
