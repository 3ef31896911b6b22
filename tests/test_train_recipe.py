"""The guards of ``lipverify finetune``: gradient clipping, skipped non-finite steps, the best epoch kept and
restored, the divergence / collapse stop (exit 4), the hopeless-eps warning and the seeded ``--limit``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lipverify.cli import main
from lipverify.models.zoo import default_samples
from lipverify.train import recipe


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    x, y = default_samples()
    p = tmp_path_factory.mktemp("data") / "samples.npz"
    np.savez(p, x=x.numpy(), y=y.numpy())
    return p


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def ft(samples, out, *extra):
    return ["finetune", "--data", samples, "--out", out, "--batch-size", "8", "--threads", "1", *extra]


# -- the detector, on synthetic histories ---------------------------------------------------------------

def _rec(epoch, loss=1.0, acc=0.9, eacc=0.9, vra=0.5, **kw):
    return {"epoch": epoch, "loss": loss, "train_accuracy": acc, "eval_accuracy_estimate": eacc,
            "eval_vra_estimate": vra, "steps": 10, "skipped_steps": 0, **kw}


def test_collapse_detector():
    chance = recipe.chance_level(10, torch.arange(100) % 10)
    assert chance == pytest.approx(0.1) and recipe.collapse_line(chance) == pytest.approx(0.15)
    assert recipe.chance_level(10, torch.tensor([3] * 7 + [1] * 3)) == pytest.approx(0.7)  # one class dominates
    h = [_rec(1), _rec(2)]
    assert recipe.divergence_reason(_rec(3), h, 0.95, chance) is None
    assert "evaluation accuracy fell" in recipe.divergence_reason(_rec(3, eacc=0.12), h, 0.95, chance)
    assert "training accuracy fell" in recipe.divergence_reason(_rec(3, acc=0.1), h, 0.95, chance)
    # a run that starts at chance (training from scratch) never "collapses"
    assert recipe.divergence_reason(_rec(1, acc=0.1, eacc=0.1), [], 0.1, chance) is None
    # non-finite / exploding losses, skipped steps
    assert "not finite" in recipe.divergence_reason(_rec(3, loss=math.nan), h, 0.95, chance)
    assert "exploded" in recipe.divergence_reason(_rec(3, loss=1e9), h, 0.95, chance)
    assert recipe.divergence_reason(_rec(1, loss=1e9), [], 0.95, chance) is None  # a huge starting bound
    assert recipe.divergence_reason(_rec(3, loss=5e5), h, 0.95, chance) is None
    assert "non-finite" in recipe.divergence_reason(_rec(3, skipped_steps=6), h, 0.95, chance)
    assert "in a row" in recipe.divergence_reason(_rec(3, aborted_nonfinite=True), h, 0.95, chance)


def test_best_ranking_and_restore():
    from lipverify.train.distributed import DistContext
    from lipverify.train.loop import TrainConfig, Trainer

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))
            self.local = None

    assert recipe.better((0.5, 0.8), (0.5, 0.7)) and recipe.better((0.6, 0.1), (0.5, 0.9))
    assert not recipe.better((0.5, 0.7), (0.5, 0.7)) and not recipe.better(None, None)
    tr = Trainer(Step(), torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), TrainConfig(epochs=4, batch_size=2),
                 DistContext())
    tr.snapshot_start()
    assert tr.best["epoch"] == 0 and tr.best["score"] is None
    for e, (vra, acc) in enumerate([(0.2, 0.9), (0.4, 0.8), (0.4, 0.85), (0.1, 0.2), (0.4, 0.85), (0.3, 0.9)],
                                   start=1):
        with torch.no_grad():
            tr.inner.w.fill_(e)
        tr.epoch = e
        tr.consider_best({"epoch": e, "eval_vra_estimate": vra, "eval_accuracy_estimate": acc})
    assert tr.best["epoch"] == 5  # epoch 3 beat 2 (same VRA, higher accuracy); 5 ties with 3: the later wins
    assert tr.restore_best() == 5 and torch.equal(tr.inner.w.detach(), torch.full((3,), 5.0))
    # the best state survives a weights-only checkpoint round trip (resume keeps it)
    import io

    from lipverify.train.checkpoint import plain

    buf = io.BytesIO()
    torch.save(plain(tr.state_dict()), buf)
    st = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert st["best"]["epoch"] == 5 and torch.equal(st["best"]["state"]["w"], torch.full((3,), 5.0))


# -- the training step -------------------------------------------------------------------------------------

class _Bound:
    def converge(self, **kw):
        pass

    def global_estimate(self):
        return 1.0


class _Toy(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.scale = scale
        self.local = None
        self.bound = _Bound()

    def forward(self, x, y, *a):
        out = self.lin(x) * self.scale
        loss = torch.nn.functional.cross_entropy(out, y) * self.scale
        return loss, out.detach(), torch.ones(2, 2)


def _toy_trainer(scale, clip, opt="sgd"):
    from lipverify.train.distributed import DistContext
    from lipverify.train.loop import TrainConfig, Trainer

    torch.manual_seed(0)
    tr = Trainer(_Toy(scale), torch.randn(8, 4), torch.arange(8) % 2, TrainConfig(epochs=1, batch_size=8, lr=1.0,
                                                                                 warmup=0, grad_clip=clip),
                 DistContext())
    if opt == "sgd":  # plain SGD makes the update proportional to the (clipped) gradient
        tr.opt = torch.optim.SGD([p for p in tr.inner.parameters()], lr=1.0)
    return tr


def test_grad_clip_bounds_the_update_and_nonfinite_steps_are_skipped():
    tr = _toy_trainer(1e6, clip=1.0)
    w0 = [p.detach().clone() for p in tr.inner.parameters()]
    x, y, _ = tr._batch(tr._perm(0), 0, 0)
    loss, _, _ = tr.step_module(x, y)
    taken, clipped, gnorm = tr._optimizer_step(loss)
    assert taken and clipped and gnorm > 1.0
    step = torch.sqrt(sum(((p.detach() - a) ** 2).sum() for p, a in zip(tr.inner.parameters(), w0)))
    assert float(step) <= 1.0 + 1e-4
    # without the clip the same step is enormous
    tr2 = _toy_trainer(1e6, clip=0.0)
    w0 = [p.detach().clone() for p in tr2.inner.parameters()]
    loss, _, _ = tr2.step_module(x, y)
    assert tr2._optimizer_step(loss)[:2] == (True, False)
    assert float(torch.sqrt(sum(((p.detach() - a) ** 2).sum() for p, a in zip(tr2.inner.parameters(), w0)))) > 1e3
    # a non-finite loss: no update at all, counted in the epoch record
    tr3 = _toy_trainer(float("inf"), clip=1.0, opt="adam")
    w0 = [p.detach().clone() for p in tr3.inner.parameters()]
    rec = tr3.train_epoch()
    assert rec["skipped_steps"] == rec["steps"] == 1 and not math.isfinite(rec["loss"])
    assert all(torch.equal(p.detach(), a) for p, a in zip(tr3.inner.parameters(), w0))
    assert "non-finite" in recipe.divergence_reason(rec, [], 0.9, 0.5)


# -- end to end --------------------------------------------------------------------------------------------

def test_forced_divergence_exits_4_and_restores_the_best_epoch(samples, tmp_path):
    out = tmp_path / "div"
    # the training eps ramps linearly to 100x the model's radii: epoch 1 is fine, epoch 2 collapses
    res = invoke(ft(samples, out, "--eps", "100", "--eps-schedule", "linear", "--eps-ramp-epochs", "50",
                    "--epochs", "6", "--lr", "0.03", "--quiet"))
    assert res.exit_code == 4, res.output
    assert "THE RUN DIVERGED" in res.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["diverged"] is True and rep["divergence"] and rep["recipe"]["diverged"]
    rc = rep["recipe"]
    assert rc["epochs_done"] < 6 and rc["restored_epoch"] is not None and rc["restored_epoch"] < rc["epochs_done"]
    line = recipe.collapse_line(recipe.chance_level(10, torch.from_numpy(np.load(samples)["y"])))
    assert rep["after"]["clean_accuracy"] > line  # not the collapsed network
    if rc["restored_epoch"] > 0:
        best = rep["history"][rc["restored_epoch"] - 1]
        assert rep["after"]["clean_accuracy"] == pytest.approx(best["eval_accuracy_estimate"], abs=1 / 32 + 1e-9)
    assert any("diverged" in n for n in rep["notes"]) and any("restored" in n for n in rep["notes"])
    assert (out / "model.onnx").is_file() and (out / "model.pt").is_file()
    torch.load(out / "checkpoint.pt", weights_only=True)  # the best state is stored weights-only


def test_hopeless_eps_warning_and_recipe(samples, tmp_path):
    res = invoke(ft(samples, tmp_path / "h", "--eps", "1e4", "--epochs", "1", "--lr", "1e-4"))
    assert res.exit_code in (0, 4), res.output
    assert "makes eps=10000 hopeless" in res.stderr and "times too small" in res.stderr
    rep = json.loads((tmp_path / "h" / "report.json").read_text())
    assert any("hopeless" in n for n in rep["notes"])
    res = invoke(ft(samples, tmp_path / "n", "--eps", "1.0", "--epochs", "2", "--lr", "3e-3"))
    assert res.exit_code == 0, res.output
    assert "hopeless" not in res.stderr and "recipe: gradient clip 1000" in res.stderr
    rep = json.loads((tmp_path / "n" / "report.json").read_text())
    assert rep["diverged"] is False and rep["recipe"]["grad_clip"] == 1000.0
    assert rep["recipe"]["exported_epoch"] in (1, 2)


def test_limit_draws_a_seeded_random_subset(tmp_path):
    x, y = default_samples()
    order = torch.argsort(y, stable=True)  # a class-sorted file
    p = tmp_path / "sorted.npz"
    np.savez(p, x=x[order].numpy(), y=y[order].numpy())
    first = set(y[order][:8].tolist())
    idx = recipe.random_subset_index(32, 8, seed=0)
    assert torch.equal(idx, recipe.random_subset_index(32, 8, seed=0)) and len(set(idx.tolist())) == 8
    assert len(set(y[order][idx].tolist())) > len(first)
    out = tmp_path / "o"
    res = invoke(["finetune", "--data", p, "--limit", "8", "--eps", "1.0", "--out", out, "--batch-size", "8",
                  "--epochs", "1", "--quiet"])
    assert res.exit_code in (0, 4), res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["n_train"] == 8 and "random subset of 8" in rep["recipe"]["limit"]
    assert not any("covers only 2" in n or "covers only 3" in n for n in rep["notes"])


# -- the warm start (--warm-start-epochs) --------------------------------------------------------------------

def test_warm_start_loss_is_ce_plus_weighted_log_bound():
    from lipverify.train.loop import TrainConfig
    from lipverify.train.losses import warm_start_loss

    torch.manual_seed(0)
    logits, y = torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2, 3, 0])
    K = (torch.rand(4, 4) * 1e6 + 1.0).fill_diagonal_(0.0).requires_grad_()
    loss = warm_start_loss(logits, y, K, 0.25)
    want = torch.nn.functional.cross_entropy(logits, y) + 0.25 * math.log(float(K.detach().max()))
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    loss.backward()  # the log term pulls on the largest margin constant only, with weight w / K_max
    g = K.grad.clone()
    i = int(K.detach().argmax())
    assert float(g.view(-1)[i]) == pytest.approx(0.25 / float(K.max()), rel=1e-5)
    assert float(g.view(-1).abs().sum() - g.view(-1)[i].abs()) == 0.0
    # the phase: warm before warm_start epochs, then the certified loss with its eps ramp shifted
    cfg = TrainConfig(loss="emma", eps=0.3, eps_schedule="linear", eps_ramp=2.0, epochs=5, warm_start=1.0)
    assert cfg.in_warm_start(0.0) and cfg.in_warm_start(0.99) and not cfg.in_warm_start(1.0)
    assert cfg.eps_at()(cfg.robust_t(0.5)) == 0.0 and cfg.eps_at()(cfg.robust_t(2.0)) == pytest.approx(0.15)
    off = TrainConfig(loss="emma", eps=0.3, epochs=5)
    assert not off.in_warm_start(0.0) and off.robust_t(1.5) == 1.5


def test_warm_start_run_records_the_phase_and_resumes_exactly(samples, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ("--eps", "1.0", "--epochs", "3", "--warm-start-epochs", "1", "--warm-start-weight", "0.2", "--loss", "emma",
             "--eval-limit", "8", "--quiet")
    assert invoke(ft(samples, a, *extra)).exit_code == 0
    res = invoke(ft(samples, b, *extra, "--stop-after-epochs", "1"))
    assert res.exit_code == 0, res.output
    assert invoke(ft(samples, b, *extra, "--resume")).exit_code == 0
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert [h["warm_start"] for h in ra["history"]] == [True, False, False]
    assert ra["history"][0]["eps_train"] == 0.0 or ra["history"][0]["eps_train"] < 0.3
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
    assert ra["after"]["vra"] == rb["after"]["vra"]
    sa = torch.load(a / "model.pt", map_location="cpu", weights_only=True)
    sb = torch.load(b / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
