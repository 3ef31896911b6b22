"""Local-Lipschitz training pieces (Huang et al.): exact live row norms, interval bounds that contain the
network on the ball, local margin constants below the global ones, learned thresholds with gradients,
per-example vectors in low precision; and the loop's augmentation / checkpoint helpers."""

from __future__ import annotations

import copy

import pytest
import torch

import lipverify
from lipverify.importers.normalize import PixelSpaceModel
from lipverify.models.zoo import default_samples
from lipverify.train import surgery
from lipverify.train.local import LocalBound, live_sq_row_norms
from lipverify.train.trainable import (
    GloroBound,
    build_trainable_graph,
    select_trainable,
)


@pytest.fixture(scope="module")
def setup():
    lm = lipverify.load()
    x, y = default_samples()
    gm = copy.deepcopy(lm.module.model)
    surgery.swap_relu(gm, "clip", x)
    net = PixelSpaceModel(gm, None)
    graph = build_trainable_graph(gm, (1, 28, 28))
    b = GloroBound(net, graph)
    select_trainable(net, graph)
    loc = LocalBound(b, gm, None, len(y), power_iters=3, sparsity_weight=0.1)
    return lm, x, y, gm, net, graph, b, loc


def test_live_row_norms_are_exact(setup):
    _, _, _, _, _, graph, _, _ = setup
    n = 0
    for node in graph.nodes:
        if node.kind != "linear":
            continue
        r2 = live_sq_row_norms(node.op)
        if r2 is None:
            continue
        want = node.op.row_norms("2")
        assert torch.allclose(r2.detach().double().sqrt(), want, rtol=1e-5, atol=1e-7)
        n += 1
    assert n >= 3


def test_intervals_contain_the_ball_and_local_K_below_global(setup):
    _, x, y, gm, net, graph, b, loc = setup
    eps = 0.3
    with torch.no_grad():
        vals = loc.node_values(x)
        L = b.node_lipschitz(skip_output=True)
        lbs, ubs, var = loc.bounds(x, vals, eps, L)
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            d = torch.randn(x.shape, generator=g)
            d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * torch.rand(len(x), 1, 1, 1, generator=g)
            v2 = loc.node_values(x + d)
            for i in range(1, len(graph.nodes)):
                if lbs[i] is None:
                    continue
                assert bool((v2[i] >= lbs[i] - 1e-4).all() and (v2[i] <= ubs[i] + 1e-4).all()), graph.nodes[i].name
    loss, logits, Ky, sp = loc(x, y, eps, torch.arange(len(y)))
    Kg = b.margin_constants().detach()
    assert bool((Ky.detach() <= Kg[y] + 1e-6).all())
    assert torch.allclose(logits, net(x), atol=1e-5)
    assert float(sp.detach()) > 0


def test_thresholds_get_gradients_and_vectors_are_half_precision(setup):
    _, x, y, gm, net, graph, b, loc = setup
    thetas = [m.theta for m in gm.modules() if isinstance(m, surgery.ClippedReLU)]
    for t in thetas:
        t.grad = None
    loss, *_ = loc(x, y, 0.3, torch.arange(len(y)))
    loss.backward()
    assert all(t.grad is not None and float(t.grad.abs().sum()) > 0 for t in thetas)
    assert loc.vectors and all(v.dtype == torch.float16 for v in loc.vectors.values())
    assert all(bool(f.all()) for f in loc.filled.values())
    st = loc.vector_state()
    loc2 = copy.copy(loc)
    loc2.vectors = {k: torch.zeros_like(v) for k, v in loc.vectors.items()}
    loc2.filled = {k: torch.zeros_like(v) for k, v in loc.filled.items()}
    loc2.load_vector_state(st)
    assert all(torch.equal(loc2.vectors[k], loc.vectors[k]) for k in loc.vectors)


def test_augment_is_deterministic_and_shape_preserving():
    from lipverify.train.loop import augment_batch

    x = torch.rand(6, 1, 8, 8)
    a = augment_batch(x, ("crop", "flip"), torch.Generator().manual_seed(3))
    b = augment_batch(x, ("crop", "flip"), torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    # a crop moves pixels, it never invents values other than zero padding
    vals = set(x.flatten().tolist()) | {0.0}
    assert set(a.flatten().tolist()) <= vals


def test_checkpoint_atomic_and_config_check(tmp_path):
    from lipverify.errors import UserInputError
    from lipverify.train import checkpoint as ck

    p = tmp_path / "checkpoint.pt"
    ck.save(p, {"epoch": 3, "w": torch.ones(2)})
    assert ck.load(p)["epoch"] == 3
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"]
    with pytest.raises(UserInputError, match="different settings"):
        ck.check_resume_config({"lr": 1e-3, "loss": "gloro"}, {"lr": 1e-2, "loss": "gloro"})
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError):
        ck.load(p)
