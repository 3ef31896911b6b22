"""``lipverify audit``: the two-sided report.
"""

from __future__ import annotations

import click

from lipverify.cli.common import (
    check_outputs,
    clip_option,
    data_options,
    handle_errors,
    load_dataset,
    load_model,
    model_options,
    require_decision,
)
from lipverify.errors import SoundnessViolation


@click.command()
@model_options
@data_options
@click.option("--eps", default=None, help="Radii to report (default: a few fractions of the median adversarial radius).")
@click.option("--norm", type=click.Choice(["2", "inf"]), default="2", show_default=True)
@click.option("--clip", default=None, help="Input domain LO,HI (default 0,1 when the data lies in [0,1]; 'none').")
@click.option("--out", "out_dir", default="lipverify-audit", show_default=True, help="Output folder for the report.")
@click.option("--strength", type=click.Choice(["fast", "standard", "thorough"]), default="standard",
              show_default=True, help="Attack effort for the adversarial radii.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--method", type=click.Choice(["global", "local"]), default="local", show_default=True,
              help="Certificates: global constants only, or also the (sound) local constants by bisection.")
@handle_errors
def audit(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device, debug, data_path, layout,
          limit, batch_size, quiet, eps, norm, clip, out_dir, strength, seed, method):
    """Two-sided report: sound bounds and certificates next to lower bounds and attacks."""
    from pathlib import Path

    from lipverify.certify import parse_eps
    from lipverify.data.atomic import check_not_input, staged_outputs
    from lipverify.report.audit import run_audit
    from lipverify.report.files import REPORT_FILES, render

    check_outputs((model, data_path), folders={"--out": out_dir})
    eps_list = sorted(set(parse_eps(eps)))  # arguments are checked before any work
    out = Path(out_dir)
    for name in REPORT_FILES:
        check_not_input(out / name, model, data_path)
    lm = load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device)
    require_decision(lm, "audit")
    ds = load_dataset(lm, data_path, layout, limit if limit is not None else 200, mean, std,
                      need_labels=True)
    box = clip_option(clip, ds.x)
    if box is not None:
        lm.set_domain(*box)
    from rich.console import Console

    err = Console(stderr=True)
    show = (lambda msg: err.print(f"[dim]audit: {msg}...[/dim]")) if (not quiet and err.is_terminal) else None
    if not eps_list:
        eps_list = [0.1, 0.3, 1.0] if norm == "2" else [1 / 255, 2 / 255, 8 / 255]
    res = run_audit(lm, ds.x, ds.y, eps_list, norm=norm, clip=box, seed=seed, strength=strength, progress=show,
                    method=method)
    res.notes = res.notes + ds.notes
    files = render(res)
    with staged_outputs(out, last="report.json") as stage:  # the report's files appear together or not at all
        for name, data in files.items():
            (stage / name).write_bytes(data)
    con = Console()
    if res.violations:
        con.print(f"[bold red]SOUNDNESS VIOLATION on {len(res.violations)} input(s)[/bold red]")
    con.print(f"[bold]lipverify audit[/bold]  model {lm.name}  norm l{norm}  inputs {res.n}")
    for v in res.verdict:
        con.print(f"- {v}")
    con.print(f"report: {out / 'report.html'} (also report.md, report.json)   time {res.time_s:.1f} s")
    if res.violations:
        raise SoundnessViolation(f"{len(res.violations)} certified input(s) broken by an attack; see {out}")
