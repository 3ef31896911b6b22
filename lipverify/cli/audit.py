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
    norm_option,
    require_decision,
)
from lipverify.errors import SoundnessViolation

#: inputs audited when --limit is not given
DEFAULT_LIMIT = 200


@click.command()
@model_options
@data_options(default_limit=DEFAULT_LIMIT)
@click.option("--eps", default=None,
              help="Radii to report, e.g. 0.1,0.3 or 2/255,8/255 (default: 0.1,0.3,1 for l2; "
                   "1/255,2/255,8/255 for l_inf).")
@norm_option("2")
@click.option("--clip", default=None, help="Input domain LO,HI (default 0,1 when the data lies in [0,1]; 'none').")
@click.option("--out", "out_dir", default="lipverify-audit", show_default=True, help="Output folder for the report.")
@click.option("--strength", type=click.Choice(["auto", "fast", "standard", "thorough"]), default="standard",
              show_default=True,
              help="Attack effort for the adversarial radii (lowered to fit --time-budget, and said so; "
                   "'auto': the strongest that fits).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--method", type=click.Choice(["global", "local"]), default="local", show_default=True,
              help="Certificates: global constants only (no local work at all), or also local certificates: "
                   "sound local constants by bisection, or CROWN where the global certificates are weak "
                   "(the notes say which).")
@click.option("--steps", default="all", show_default=True,
              help="Steps to run, comma-separated, from: attack, local, lower, lipsdp (bounds and the global "
                   "certificates always run); 'all'.")
@click.option("--time-budget", default="auto", show_default=True,
              help="Seconds for the analysis (e.g. 120, 3m): attack strength, lower-bound effort, local "
                   "certificates and, if need be, the number of inputs are reduced to fit, and the report says "
                   "what was reduced; 'auto': 15 s plus the time of 100,000 forward-backward passes of one input "
                   "(measured), at most 150 s; 'none' runs everything as asked.")
@handle_errors
def audit(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device, debug, data_path, layout,
          limit, batch_size, quiet, eps, norm, clip, out_dir, strength, seed, method, steps, time_budget):
    """Two-sided report: sound bounds and certificates next to lower bounds and attacks.

    The first line of the output answers the question; report.html, report.md and report.json in --out
    hold the details (written after every step, so an interrupted audit leaves a partial report)."""
    import time
    from pathlib import Path

    from lipverify.arguments import parse_eps
    from lipverify.data.atomic import check_not_input, staged_outputs
    from lipverify.report.audit import default_eps, parse_steps, parse_time_budget, run_audit
    from lipverify.report.files import REPORT_FILES, render
    from lipverify.report.progress import Stages
    from lipverify.results import time_label

    t_start = time.perf_counter()
    check_outputs((model, data_path), folders={"--out": out_dir})
    eps_list = sorted(set(parse_eps(eps)))  # arguments are checked before any work
    run_steps = parse_steps(steps)
    budget = parse_time_budget(time_budget)
    out = Path(out_dir)
    for name in REPORT_FILES:
        check_not_input(out / name, model, data_path)
    stages = Stages(run_steps, quiet=quiet)
    lm = load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device)
    require_decision(lm, "audit")
    ds = load_dataset(lm, data_path, layout, limit if limit is not None else DEFAULT_LIMIT, mean, std,
                      need_labels=True)
    box = clip_option(clip, ds.x)
    if box is not None:
        lm.set_domain(*box)
    load_s = time.perf_counter() - t_start
    if not eps_list:
        eps_list = default_eps(norm)

    def write(res, figures: bool):
        res.load_s = load_s
        files = render(res, figures=figures)
        with staged_outputs(out, last="report.json") as stage:  # the report's files appear together or not at all
            for name, data in files.items():
                (stage / name).write_bytes(data)

    res = run_audit(lm, ds.x, ds.y, eps_list, norm=norm, clip=box, seed=seed, strength=strength, progress=stages,
                    method=method, steps=run_steps, time_budget=budget,
                    on_step=lambda partial: write(partial, figures=False))
    res.notes = res.notes + ds.notes
    total = time.perf_counter() - t_start
    res.total_time_s = total
    res.time_label = time_label(total, load_s, "audit", res.time_s)
    write(res, figures=True)
    from lipverify.report.text import print_audit

    print_audit(res, report_path=out / "report.html")
    if res.violations:
        raise SoundnessViolation(f"{len(res.violations)} certified input(s) broken by an attack; see {out}")
