"""``lipverify bounds``: per-layer constants, the global bound and the margin constants.
"""

from __future__ import annotations

import time

import click

from lipverify.results import dumps, time_label

from lipverify.cli.common import domain_option, handle_errors, load_model, model_options, norm_option


@click.command()
@model_options
@norm_option("2")
@click.option("--method", type=click.Choice(["sound", "power", "lipsdp", "eclipse-fast", "eclipse"]), default="sound",
              show_default=True,
              help="sound: proven bounds; power: power-iteration estimates; lipsdp: LipSDP-Neuron; eclipse-fast: "
                   "closed-form compositional LipSDP certificate (ECLipsE-Fast); eclipse: the same polished "
                   "towards LipSDP-Neuron in seconds (dense nets with slopes >= 0; all verified a posteriori).")
@click.option("--clip", default=None, help="Input domain LO,HI for products/normalisations (default 0,1).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@handle_errors
def bounds(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device, debug, norm, method,
           clip, as_json):
    """Lipschitz bounds: per-layer constants, global bound, margin constants K_ij."""
    t0 = time.perf_counter()
    lm = load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device)
    domain_option(lm, clip)
    t_loaded = time.perf_counter()
    if method == "lipsdp":
        from lipverify.bounds.lipsdp_graph import lipsdp_report

        report = lipsdp_report(lm, norm)
    elif method in ("eclipse-fast", "eclipse"):
        from lipverify.bounds.lipsdp_graph import chain_report

        report = chain_report(lm, norm, method)
    else:
        report = lm.bounds(norm=norm, method=method)
    report.time_s = time.perf_counter() - t_loaded  # the analysis (loading excluded)
    report.total_time_s = time.perf_counter() - t0
    report.time_label = time_label(report.total_time_s, t_loaded - t0, "bounds", report.time_s)
    if as_json:
        d = report.to_dict()
        click.echo(dumps(d, indent=2))
        return
    from lipverify.report.text import print_bounds

    print_bounds(report)
