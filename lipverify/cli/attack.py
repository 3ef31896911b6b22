"""``lipverify attack``: adversarial radius per input and robust accuracy per eps.
"""

from __future__ import annotations

import json

import click

from lipverify.cli.common import (
    clip_option,
    data_options,
    handle_errors,
    load_dataset,
    load_model,
    model_options,
)
from lipverify.errors import UserInputError
from lipverify.report.progress import progress_bar


def _attack_box(lm, ds, clip, mean, std):
    """The input domain of the attack: the exact VNN-LIB box (mapped to pixel space) or ``--clip``.

    A VNN-LIB box is rounded *inwards* to float32 numbers, so that every float32 point the attack
    returns lies in the specification's float64 box as it is."""
    if ds.lower is not None and ds.upper is not None:
        from lipverify.data.counterexamples import float32_box

        lo, hi = ds.lower, ds.upper
        norm = getattr(lm.module, "normalize", None)
        if norm is not None and (mean is not None or std is not None):
            lo = ds.lower * norm.std.double().cpu() + norm.mean.double().cpu()
            hi = ds.upper * norm.std.double().cpu() + norm.mean.double().cpu()
        lo, hi = float32_box(lo, hi)
        return (lo.to(lm.device), hi.to(lm.device)), True
    return clip_option(clip, ds.x), False


@click.command()
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
    from lipverify.data.atomic import check_not_input

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
    found = None
    if exact_box:
        from lipverify.data.counterexamples import find_counterexamples

        found = find_counterexamples(lm, ds, rep)
    _write_attack_outputs(rep, ds, out_csv, save_npz, found)
    out = rep.to_dict()
    out["model"] = lm.name
    if exact_box:
        out["clip"] = "VNN-LIB box"
        # witnesses of each specification's own output condition (checked in float64 and float32)
        out["counterexamples_found"] = len(found)
    if as_json:
        click.echo(json.dumps(out, default=str))
        return
    from lipverify.report.text import print_attack

    print_attack(out, exact_box)


def _write_attack_outputs(rep, ds, out_csv, save_npz, found):
    import numpy as np

    from lipverify.data.atomic import atomic_write_bytes, atomic_write_text

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
        if found is not None:
            from lipverify.data.counterexamples import write_counterexamples

            write_counterexamples(save_npz, ds, found)
