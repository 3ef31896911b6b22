"""``lipverify certify``: certified radius per input.
"""

from __future__ import annotations


import click

import time

import torch

from lipverify.results import dumps, time_label

from lipverify.cli.common import (
    check_outputs,
    data_options,
    handle_errors,
    load_dataset,
    load_model,
    domain_option,
    model_options,
    norm_option,
    require_decision,
)
from lipverify.errors import UserInputError
from lipverify.report.progress import progress_bar


@click.command()
@model_options
@data_options
@click.option("--eps", default=None, help="Radius or list: 0.3 | 36/255,72/255 (default: VNN-LIB eps, else none).")
@norm_option("2")
@click.option("--method", type=click.Choice(["global", "local", "crown", "crown-ibp", "alpha-crown", "best"]), default="global",
              show_default=True,
              help="global: the GloRo rule with the global margin constants; local: also sound local constants by "
                   "bisection; crown: also linear bound propagation (CROWN) over the ball and the input domain; "
                   "crown-ibp: CROWN with interval intermediate bounds (faster, looser); alpha-crown: CROWN with "
                   "optimised ReLU slopes (tighter, about 30x slower); best: the largest sound "
                   "radius of global, local and crown.")
@click.option("--local-jacobian", type=click.Choice(["interval", "linear", "linear-refined"]), default="interval",
              show_default=True,
              help="--method local/best: how the local constants bound the Clarke Jacobian. interval: interval "
                   "bounds (fast); linear: CROWN's pre-activation bounds and a linear relaxation of the backward "
                   "pass (Shi et al. 2022; tens of times slower, much tighter on l-inf balls); linear-refined: also "
                   "linear bounds of the gradient units it depends on (seconds per input).")
@click.option("--alpha-budget", type=click.FloatRange(min=0), default=None,
              help="--method alpha-crown: seconds for the slope optimisation in all; once spent the remaining "
                   "bounds are plain CROWN's (sound; a note says so). Default: no limit.")
@click.option("--clip", default=None, help="Input domain LO,HI for products/normalisations (default 0,1).")
@click.option("--precision", type=click.Choice(["auto", "float32", "float64"]), default="auto", show_default=True,
              help="Logits in float32 with a proven rounding-error bound (inputs near a decision are recomputed "
                   "in float64), or float64 only; auto: float32 where the model has a rounding model.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--out", "out_csv", default=None, help="Per-input CSV file.")
@click.option("--plot", "plot_png", default=None, help="PNG: certified accuracy vs eps and radius histogram.")
@handle_errors
def certify(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device, debug, data_path, layout,
            limit, batch_size, quiet, eps, norm, method, local_jacobian, alpha_budget, clip, precision, as_json, out_csv,
            plot_png):
    """Certified radius per input (global GloRo rule, or IBP-masked local bounds)."""
    t_start = time.perf_counter()
    from lipverify.certify import parse_eps
    check_outputs((model, data_path), files={"--out": out_csv, "--plot": plot_png})
    eps_list = parse_eps(eps)  # arguments are checked before any work
    local_options = None if local_jacobian == "interval" else {"jacobian": local_jacobian}
    from lipverify.importers.loader import resolve_device
    from lipverify.train.distributed import process_group

    # a process group when started by torchrun, else nothing
    with process_group(resolve_device(device)) as ctx:
        if ctx.enabled:
            device = str(ctx.device)  # under torchrun with CUDA: this rank's GPU
        lm = load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device)
        require_decision(lm, "certify")
        domain_option(lm, clip)
        ds = load_dataset(lm, data_path, layout, limit, mean, std)
        eps_arg = eps_list if eps_list or ds.eps is None else ds.eps
        if ds.eps is not None and not eps_list and norm != "inf":
            raise UserInputError("VNN-LIB specifications are l-inf boxes: use --norm inf (or give --eps)", data_path)
        if eps_list and not ds.labelled:
            raise UserInputError("these VNN-LIB specs state general output properties (no single label): they are "
                                 "certified on their own boxes, drop --eps", data_path)
        t_loaded = time.perf_counter()
        total = len(ds)
        if ctx.enabled and not (ds.properties is not None and not eps_list):
            from lipverify.certify.batching import auto_batch_size
            from lipverify.certify.sharded import batch_size_for, shard

            if not batch_size:  # rank 0's automatic choice (from its free memory) on every rank
                auto = ctx.broadcast_object(auto_batch_size(lm.graph, lm.device, len(ds.y)) if ctx.is_main else None)
                batch_size = batch_size_for(len(ds.y), ctx.world, auto)
            sl = shard(len(ds.y), ctx.rank, ctx.world, batch_size)
            total = sl.stop - sl.start  # rank 0's bar follows its own shard
        if not (ds.properties is not None and not eps_list):
            from lipverify.certify.rules import progress_total

            total = progress_total(total, method)  # local: the global pass, then the local stage
        with progress_bar(total, "certifying", quiet or not ctx.is_main) as advance:
            if ds.properties is not None and not eps_list:
                lo, hi = ds.box()
                res = lm.certify_properties(ds.x, ds.properties, lo, hi, norm=norm, method=method,
                                            batch_size=batch_size or 256, progress=advance, names=ds.names)
            elif ctx.enabled:  # torchrun: this rank's shard, then one result in rank order
                from lipverify.certify.sharded import gather

                e = eps_arg[sl] if isinstance(eps_arg, torch.Tensor) else eps_arg
                res = lm.certify(ds.x[sl], ds.y[sl], eps=e, norm=norm, method=method, batch_size=batch_size,
                                 progress=advance, precision=precision, names=None if ds.names is None else list(ds.names)[sl],
                                 local_options=local_options, alpha_budget=alpha_budget)
                res = gather(res, ctx.world)
            else:
                res = lm.certify(ds.x, ds.y, eps=eps_arg, norm=norm, method=method, batch_size=batch_size,
                                 progress=advance, names=ds.names, precision=precision, local_options=local_options,
                                 alpha_budget=alpha_budget)
    if not ctx.is_main:
        return
    res.notes = list(lm.notes) + list(ds.notes) + res.notes
    _write_certify_outputs(res, out_csv, plot_png)
    res.total_time_s = time.perf_counter() - t_start
    res.time_label = time_label(res.total_time_s, t_loaded - t_start, "certify", res.time_s)
    if as_json:
        d = res.to_dict()
        d["model"] = lm.name
        click.echo(dumps(d))
        return
    from lipverify.report.text import print_certify

    print_certify(res, lm.name)


def _write_certify_outputs(res, out_csv, plot_png):
    import csv
    import io

    import numpy as np

    from lipverify.data.atomic import atomic_write_bytes, atomic_write_text

    if out_csv:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["index", "label", "pred", "margin", "radius", "certified", "method", "sound"])
        for c in res.inputs:
            w.writerow([c.index, c.label, c.pred, f"{c.margin:.9g}", f"{c.radius:.9g}", int(c.certified), c.method,
                        int(c.sound)])
        atomic_write_text(out_csv, buf.getvalue())
    if plot_png:
        from lipverify.report.plots import certify_plot

        radii = np.array([c.radius if c.sound else 0.0 for c in res.inputs])
        correct = np.array([c.label == c.pred for c in res.inputs])
        atomic_write_bytes(plot_png, certify_plot(radii, correct, res.norm, res.eps))
