"""``lipverify attack``: adversarial radius per input and robust accuracy per eps.
"""

from __future__ import annotations


import click

import time

from lipverify.arguments import eps_key
from lipverify.results import dumps, time_label

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
from lipverify.errors import UserInputError
from lipverify.report.progress import progress_bar


def _attack_box(lm, ds, clip):
    """The input domain of the attack: the exact VNN-LIB box (in the units of the data) or ``--clip``.

    A VNN-LIB box is rounded *inwards* to float32 numbers, so that every float32 point the attack
    returns lies in the specification's float64 box as it is."""
    box = ds.box()
    if box is not None:
        from lipverify.data.counterexamples import float32_box

        lo, hi = float32_box(*box)
        return (lo.to(lm.device), hi.to(lm.device)), True
    return clip_option(clip, ds.x), False


def _property_search(lm, ds, box, strength, seed, rows=None):
    """Counterexample search for each specification's own output property (rows: which examples)."""
    import torch

    from lipverify.attacks.property import property_attack
    from lipverify.data.counterexamples import spec_property

    rows = list(range(len(ds))) if rows is None else list(rows)
    if not rows:
        return {}, {}
    steps, restarts = {"fast": (30, 1), "standard": (100, 2), "thorough": (300, 6)}[strength]
    idx = torch.tensor(rows)
    props = [spec_property(lm, ds, i) for i in rows]
    res = property_attack(lm.module, ds.x[idx].to(lm.device), box[0][idx.to(box[0].device)],
                          box[1][idx.to(box[1].device)], props, steps=steps, restarts=restarts, seed=seed,
                          forward64=lm.module_double())
    points = {i: res.z[k] for k, i in enumerate(rows) if bool(res.found[k])}
    slack = {i: float(res.slack[k]) for k, i in enumerate(rows)}
    return points, slack


@click.command()
@model_options
@data_options
@click.option("--eps", default=None, help="Radius or list for the robust accuracy, e.g. 0.3 or 8/255,16/255.")
@norm_option("2")
@click.option("--clip", default=None, help="Input domain LO,HI (default 0,1 when the data lies in [0,1]; 'none': "
                                           "no box).")
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
    t_start = time.perf_counter()
    from lipverify.certify import parse_eps
    check_outputs((model, data_path), files={"--out": out_csv, "--save": save_npz})
    eps_list = sorted(set(parse_eps(eps)))  # arguments are checked before any work
    import torch

    from lipverify.importers.loader import resolve_device
    from lipverify.train.distributed import process_group

    # a process group when started by torchrun, else nothing
    with process_group(resolve_device(device)) as ctx:
        if ctx.enabled:
            device = str(ctx.device)
        lm = load_model(model, input_shape, mean, std, arch, trust_pickle, no_fidelity_check, device)
        require_decision(lm, "attack")
        ds = load_dataset(lm, data_path, layout, limit, mean, std)
        box, exact_box = _attack_box(lm, ds, clip)
        t_loaded = time.perf_counter()
        if exact_box and not ds.labelled:
            if ctx.is_main:  # general output properties: searched whole by rank 0
                _attack_properties(lm, ds, box, strength, seed, as_json, save_npz, quiet, t_start, t_loaded)
            return
        if exact_box and norm != "inf":
            raise UserInputError("VNN-LIB specifications are l-inf boxes: use --norm inf", data_path)
        n_stages = 1 + len(eps_list)
        batch_size = batch_size or 256
        sl = slice(0, len(ds))
        if ctx.enabled:  # whole batches per rank: the same batches and random numbers as one process
            from lipverify.attacks.sharded import shard

            sl = shard(len(ds), ctx.rank, ctx.world, batch_size)
        part_box = box
        if box is not None and isinstance(box[0], torch.Tensor) and box[0].dim() == ds.x.dim() \
                and box[0].shape[0] == len(ds):
            part_box = (box[0][sl], box[1][sl])
        with progress_bar((sl.stop - sl.start) * n_stages, "attacking", quiet or not ctx.is_main) as advance:
            rep = lm.attack(ds.x[sl], ds.y[sl], eps=eps_list, norm=norm, clip=part_box, strength=strength,
                            batch_size=batch_size, seed=seed, progress=advance, index_offset=sl.start,
                            names=None if ds.names is None else list(ds.names)[sl])
        if ctx.enabled:
            from lipverify.attacks.sharded import gather

            rep = gather(rep, ctx.world)
            rep.clip = box
    if not ctx.is_main:
        return
    rep.notes = list(lm.notes) + list(ds.notes) + rep.notes
    if exact_box:
        rep.notes.append("attacked inside each VNN-LIB box (the exact input set of the specification)")
    found = None
    if exact_box:
        from lipverify.data.counterexamples import find_counterexamples

        from lipverify.data.counterexamples import check_witnesses

        found = find_counterexamples(lm, ds, rep)
        # a misclassification is not always a counterexample of the spec's own condition (targeted
        # specs): search the rest for their property directly
        points, _ = _property_search(lm, ds, box, strength, seed, [i for i in range(len(ds)) if i not in found])
        found.update(check_witnesses(lm, ds, points))
    _write_attack_outputs(rep, ds, out_csv, save_npz, found)
    rep.total_time_s = time.perf_counter() - t_start
    rep.time_label = time_label(rep.total_time_s, t_loaded - t_start, "attack", rep.time_s)
    out = rep.to_dict()
    out["model"] = lm.name
    if exact_box:
        out["clip"] = "VNN-LIB box"
        # witnesses of each specification's own output condition (checked in float64 and float32)
        out["counterexamples_found"] = len(found)
    if as_json:
        click.echo(dumps(out))
        return
    from lipverify.report.text import print_attack

    out["time_label"] = rep.time_label
    print_attack(out, exact_box)


def _attack_properties(lm, ds, box, strength, seed, as_json, save_npz, quiet, t_start=None, t_loaded=None):
    """``attack`` on specifications without a single label: a counterexample search per property."""
    from lipverify.data.counterexamples import check_witnesses, spec_property, write_counterexamples

    t0 = time.perf_counter()
    with progress_bar(len(ds), "searching counterexamples", quiet) as advance:
        points, slack = _property_search(lm, ds, box, strength, seed)
        advance(len(ds))
    found = check_witnesses(lm, ds, points)
    out = {"model": lm.name, "n": len(ds), "clip": "VNN-LIB box", "strength": strength,
           "notes": list(lm.notes) + list(ds.notes) + ["searched inside each VNN-LIB box for its own output property"],
           "counterexamples_found": len(found), "time_s": time.perf_counter() - t0,
           "inputs": [{"index": i, "name": ds.names[i], "property": _short(spec_property(lm, ds, i)),
                       "counterexample": i in found, "slack": slack[i]} for i in range(len(ds))]}
    if save_npz:
        write_counterexamples(save_npz, ds, found)
        out["counterexample_files"] = len(found)
    if t_start is not None:
        out["total_time_s"] = time.perf_counter() - t_start
        out["time_label"] = time_label(out["total_time_s"], t_loaded - t_start, "attack", out["time_s"])
    if as_json:
        click.echo(dumps(out))
        return
    from lipverify.report.text import print_property_attack

    print_property_attack(out)


def _short(prop) -> str:
    return prop.kind if prop.label is None else f"{prop.kind}, label {prop.label}"


def _write_attack_outputs(rep, ds, out_csv, save_npz, found):
    import numpy as np

    from lipverify.data.atomic import atomic_write_bytes, atomic_write_text

    if out_csv:
        keys = [eps_key(e) for e in rep.eps]
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
