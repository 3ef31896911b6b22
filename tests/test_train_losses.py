"""Certified fine-tuning losses against hand computations; the GloRo bottom class and the certify rule."""

from __future__ import annotations

import math

import pytest
import torch

from lipverify.certify import certified_at, global_radii
from lipverify.train import losses as L
from lipverify.train.schedules import EpsSchedule, LinearRamp, lr_factor

K3 = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.5], [2.0, 1.5, 0.0]], dtype=torch.float64)


def _ce(z, y):
    return -z[y] + math.log(sum(math.exp(v) for v in z))


def test_gloro_bottom_and_ce_by_hand():
    f = torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64)
    # prediction 0; y_bot = max(f_1 + 0.5 K_01, f_2 + 0.5 K_02) = max(1.5, 1.0)
    assert L.gloro_bottom(f, K3, 0.5).item() == pytest.approx(1.5)
    ext = L.gloro_logits(f, K3, 0.5)
    assert ext.tolist() == [[3.0, 1.0, 0.0, 1.5]]
    for y in (0, 1, 2):
        got = L.gloro_ce(f, torch.tensor([y]), K3, 0.5).item()
        assert got == pytest.approx(_ce([3.0, 1.0, 0.0, 1.5], y), rel=1e-12)


def test_gloro_trades_by_hand():
    f = [0.2, 1.3, -0.4]
    y, eps, lam = 2, 0.3, 1.7
    t = torch.tensor([f], dtype=torch.float64)
    j = 1
    ybot = max(f[i] + eps * K3[j, i].item() for i in range(3) if i != j)
    zq = f + [ybot]
    p = [math.exp(v) / sum(math.exp(w) for w in f) for v in f]
    q = [math.exp(v) / sum(math.exp(w) for w in zq) for v in zq]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q[:3]))
    want = _ce(f, y) + lam * kl
    got = L.gloro_trades(t, torch.tensor([y]), K3, eps, lam).item()
    assert got == pytest.approx(want, rel=1e-12)


def test_emma_by_hand():
    f = [3.0, 1.0, 0.5]
    y, eps = 1, 0.5
    # K_y = [1, 0, 1.5]; d_i = f_y - f_i = [-2, 0, 0.5]
    # eps_0 = clip(-2 / 0.5, .01, 1) = 0.01; eps_2 = clip(0.5 / 0.75, .01, 1) = 2/3
    z = [3.0 + 0.01 * 0.5 * 1.0, 1.0, 0.5 + (2 / 3) * 0.5 * 1.5]
    got = L.emma(torch.tensor([f], dtype=torch.float64), torch.tensor([y]), K3, eps).item()
    assert got == pytest.approx(_ce(z, y), rel=1e-12)
    ei = L.emma_eps_i(torch.tensor([f], dtype=torch.float64), torch.tensor([y]), K3[[y]], eps)
    assert ei[0, 0].item() == pytest.approx(0.01) and ei[0, 2].item() == pytest.approx(2 / 3)


def test_emma_eps_i_has_no_gradient():
    f = torch.tensor([[3.0, 1.0, 0.5], [0.1, 0.2, 0.3]], dtype=torch.float64, requires_grad=True)
    K = K3.clone().requires_grad_(True)
    y = torch.tensor([1, 2])
    eps = 0.5
    ei = L.emma_eps_i(f, y, K[y], eps)
    assert not ei.requires_grad
    L.emma(f, y, K, eps).backward()
    g_auto_f, g_auto_K = f.grad.clone(), K.grad.clone()
    # the same loss with eps_i frozen to their values: identical gradients
    f2 = f.detach().clone().requires_grad_(True)
    K2 = K3.clone().requires_grad_(True)
    Ky = K2[y]
    not_y = 1.0 - torch.nn.functional.one_hot(y, 3).double()
    z = f2 + ei.detach().clone() * eps * Ky * not_y
    torch.nn.functional.cross_entropy(z, y).backward()
    assert torch.allclose(g_auto_f, f2.grad, atol=1e-14)
    assert torch.allclose(g_auto_K, K2.grad, atol=1e-14)
    # and they differ from a version where eps_i would carry gradient
    f3 = f.detach().clone().requires_grad_(True)
    d = f3.gather(1, y[:, None]) - f3
    e3 = (d / (eps * K3[y]).clamp_min(1e-12)).clamp(0.01, 1.0)
    torch.nn.functional.cross_entropy(f3 + e3 * eps * K3[y] * not_y, y).backward()
    assert not torch.allclose(g_auto_f, f3.grad)


def test_worst_case_ce_by_hand():
    f = [0.5, 2.0, 1.0]
    Ky = torch.tensor([[0.4, 0.0, 0.9]], dtype=torch.float64)
    got = L.worst_case_ce(torch.tensor([f], dtype=torch.float64), torch.tensor([1]), Ky, 0.5).item()
    assert got == pytest.approx(_ce([0.5 + 0.2, 2.0, 1.0 + 0.45], 1), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_bottom_exactly_when_certification_fails(seed):
    g = torch.Generator().manual_seed(seed)
    m, B = 6, 400
    A = torch.rand(m, m, generator=g, dtype=torch.float64)
    K = (A + A.T) * 2
    K.fill_diagonal_(0.0)
    logits = torch.randn(B, m, generator=g, dtype=torch.float64)
    # exact ties for the top logit, and margins sitting exactly on eps * K
    top = logits[:20].max(1).values
    logits[:20, 0] = top
    logits[:20, 1] = top
    eps = 0.25
    j = logits[20:40].argmax(1)
    second = (j + 1) % m
    logits[20:40, second] = logits[20:40].gather(1, j[:, None])[:, 0] - eps * K[j, second]
    pred, margin, radius, diffs, mask = global_radii(logits, K)
    cert = certified_at(diffs, mask, K[pred], torch.full((B,), eps, dtype=torch.float64))
    gp = L.gloro_predict(logits, K, eps)
    assert torch.equal(gp == m, ~cert)
    assert torch.equal(gp[cert], pred[cert])
    assert bool((gp[:20] == m).all())  # ties are never certified


def test_gloro_predict_matches_certify_on_a_model():
    import lipverify
    from lipverify.models.zoo import default_samples

    lm = lipverify.load()
    x, y = default_samples()
    eps = 0.4
    res = lm.certify(x, y, eps=eps)
    with torch.no_grad():
        logits = lm.module_double()(x.double())
    gp = L.gloro_predict(logits, lm.margin_constants().K, eps)
    cert = torch.tensor([c.certified_at[eps] for c in res.inputs])
    assert torch.equal(gp != 10, cert)


def test_schedules():
    s = EpsSchedule(0.3, "linear", 1.2, ramp=10)
    assert s(0) == 0 and s(5) == pytest.approx(0.18) and s(10) == pytest.approx(0.36) and s(20) == pytest.approx(0.36)
    lg = EpsSchedule(0.3, "log", 1.0, ramp=10)
    assert lg(0) == pytest.approx(0.003) and lg(10) == pytest.approx(0.3)
    assert all(lg(t) <= lg(t + 1) for t in range(12))
    lr = EpsSchedule(0.1, "liresnet", ramp=4)
    assert lr(0) == pytest.approx(0.01) and lr(4) == pytest.approx(0.15) and lr(2) == pytest.approx(0.08)
    assert EpsSchedule(0.3)(7) == pytest.approx(0.3)
    lam = LinearRamp.parse("0.1,2.0,10")
    assert lam(0) == pytest.approx(0.1) and lam(5) == pytest.approx(1.05) and lam(11) == 2.0
    assert LinearRamp.parse("3")(100) == 3.0
    assert lr_factor(0.5, 10, 1) == pytest.approx(0.5 + 0.5e-3)
    assert lr_factor(1, 10, 1) == pytest.approx(1.0) and lr_factor(10, 10, 1) == pytest.approx(0.0)
    from lipverify.errors import UserInputError

    with pytest.raises(UserInputError):
        LinearRamp.parse("1,2")
    with pytest.raises(UserInputError):
        EpsSchedule(0.3, "cubic")
