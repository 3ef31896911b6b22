"""LipSDP (neuron / layer forms) with a posteriori verification.

Independent oracles:
* published values for the LipSDP authors' ``random_weights.mat`` (layer 39.839, neuron 36.482,
  product of spectral norms 43.306);
* sampled Jacobians ``||J(x)||_2`` (lower bounds on the true constant, with random biases);
* brute force over all activation patterns: LipSDP certifies every activation slope-restricted in
  ``[alpha, beta]``, linear ones included, so it is >= ``max_D ||W_L D_L ... D_1 W_0||`` over all
  diagonal ``D`` with entries in ``{alpha, beta}``;
* the product of spectral norms (upper end);
* the LMI itself, rebuilt from the returned multipliers and checked with ``eigvalsh``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lipverify.bounds.lipsdp import (
    LipSDPResult,
    lipsdp,
    lipsdp_matrix,
    product_bound,
    split_network,
    verify_multipliers,
)
from lipverify.errors import UserInputError


def _rand_net(widths, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return [
        scale * rng.standard_normal((widths[i + 1], widths[i])) / math.sqrt(widths[i])
        for i in range(len(widths) - 1)
    ]


def _sampled_jacobian_max(weights, alpha=0.0, beta=1.0, n=4000, seed=0):
    """max ||J(x)||_2 over random inputs of the piecewise-linear net with random biases (a lower bound)."""
    rng = np.random.default_rng(seed)
    biases = [rng.standard_normal(w.shape[0]) * 0.5 for w in weights[:-1]]
    X = rng.standard_normal((n, weights[0].shape[1])) * 2.0
    best = 0.0
    h = X
    # slopes per sample and layer
    Ds = []
    for w, b in zip(weights[:-1], biases):
        v = h @ w.T + b
        d = np.where(v > 0, beta, alpha)
        Ds.append(d)
        h = v * d
    for i in range(n):
        J = weights[0]
        for w, d in zip(weights[1:], Ds):
            J = w @ (d[i][:, None] * J)
        best = max(best, float(np.linalg.norm(J, 2)))
    return best


def _pattern_max(weights, alpha=0.0, beta=1.0):
    """max over all 2^N slope patterns in {alpha, beta} of ||W_L D_L ... D_1 W_0||_2."""
    widths = [w.shape[1] for w in weights[1:]]
    best = 0.0
    for pat in itertools.product((alpha, beta), repeat=sum(widths)):
        pat = np.asarray(pat)
        J = weights[0]
        pos = 0
        for w, nk in zip(weights[1:], widths):
            J = w @ (pat[pos:pos + nk][:, None] * J)
            pos += nk
        best = max(best, float(np.linalg.norm(J, 2)))
    return best


def _lmi_max_eig(weights, res: LipSDPResult, alpha=0.0, beta=1.0):
    """Largest eigenvalue of M(value^2, T) for the returned multipliers (must be <= 0)."""
    M = lipsdp_matrix(weights, res.value**2, res.multipliers[0], alpha, beta)
    return float(np.linalg.eigvalsh(M)[-1]), float(np.abs(M).max())


# ------------------------------------------------------------------------------------------------
# published reference values
# ------------------------------------------------------------------------------------------------


def _load_mat(realdata, name):
    sio = pytest.importorskip("scipy.io")
    path = realdata / "lipsdp" / name
    if not path.exists():
        pytest.skip(f"{name} not in the data folder")
    return [np.asarray(w, dtype=np.float64) for w in sio.loadmat(path)["weights"].ravel()]


@pytest.mark.realdata
def test_random_weights_published_values(realdata):
    ws = _load_mat(realdata, "random_weights.mat")
    assert [w.shape for w in ws] == [(10, 2), (30, 10), (20, 30), (2, 20)]
    prod = product_bound(ws)
    assert abs(prod - 43.306) <= 0.01
    neuron = lipsdp(ws, form="neuron")
    layer = lipsdp(ws, form="layer")
    for r in (neuron, layer):
        assert r.sound and "verified a posteriori" in r.method
        assert r.status == "optimal"
        assert r.value <= prod
        assert len(r.parts) == 1
    assert abs(neuron.value - 36.482) <= 0.01, neuron.value
    assert abs(layer.value - 39.839) <= 0.01, layer.value
    assert neuron.value <= layer.value
    # the certificate really holds: M(value^2, T) <= 0 on the original weights
    for r in (neuron, layer):
        lam, scale = _lmi_max_eig(ws, r)
        assert lam <= 1e-12 * scale
    # and is a valid bound for the network with any biases
    assert _sampled_jacobian_max(ws, n=2000) <= neuron.value


@pytest.mark.realdata
def test_mnist_weights(realdata):
    ws = _load_mat(realdata, "mnist_weights.mat")
    assert [w.shape for w in ws] == [(50, 784), (10, 50)]
    r = lipsdp(ws)
    prod = product_bound(ws)
    assert r.sound and r.value <= prod
    assert _sampled_jacobian_max(ws, n=500) <= r.value
    lam, scale = _lmi_max_eig(ws, r)
    assert lam <= 1e-12 * scale


# ------------------------------------------------------------------------------------------------
# tiny networks with a known / brute-forced answer
# ------------------------------------------------------------------------------------------------


def test_orthogonal_sandwich_is_exact():
    """f(x) = Q^T relu(Q x): every Jacobian Q^T D Q has norm <= 1 and D = I gives 1, so Lip = 1."""
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    r = lipsdp([Q, Q.T])
    assert r.sound
    assert 1.0 <= r.value <= 1.0 + 1e-3


def test_identity_relu_difference():
    """relu(x) - relu(-x) = x has Lip 1, but the slope pattern (1, 1) gives 2: LipSDP (which bounds
    every slope-restricted activation) returns 2, equal to the product bound.  Documents the
    over-approximation of ReLU by its slope restriction."""
    W0 = np.array([[1.0], [-1.0]])
    W1 = np.array([[1.0, -1.0]])
    r = lipsdp([W0, W1])
    assert _pattern_max([W0, W1]) == pytest.approx(2.0)
    assert 2.0 <= r.value <= 2.0 * (1 + 1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bruteforce_patterns_relu(seed):
    ws = _rand_net([2, 4, 4, 2], seed)
    r = lipsdp(ws)
    sampled = _sampled_jacobian_max(ws, seed=seed)
    patterns = _pattern_max(ws)
    assert sampled <= patterns * (1 + 1e-12)
    assert r.sound
    assert patterns <= r.value <= product_bound(ws)
    # layer form: still sound, never tighter than the neuron form (up to solver accuracy)
    rl = lipsdp(ws, form="layer")
    assert patterns <= rl.value <= product_bound(ws)
    assert r.value <= rl.value * (1 + 1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_bruteforce_patterns_leaky_relu(seed):
    a = 0.1
    ws = _rand_net([3, 4, 5, 2], 10 + seed)
    r = lipsdp(ws, alpha=a, beta=1.0)
    sampled = _sampled_jacobian_max(ws, alpha=a, beta=1.0, seed=seed)
    patterns = _pattern_max(ws, alpha=a, beta=1.0)
    assert sampled <= patterns * (1 + 1e-12)
    assert r.sound
    assert patterns <= r.value <= product_bound(ws, alpha=a, beta=1.0)
    lam, scale = _lmi_max_eig(ws, r, alpha=a, beta=1.0)
    assert lam <= 1e-12 * scale


def test_single_matrix_is_spectral_norm():
    W = np.random.default_rng(0).standard_normal((5, 7))
    r = lipsdp([W])
    assert r.sound
    assert r.value == pytest.approx(np.linalg.norm(W, 2), rel=1e-5)
    assert r.value >= np.linalg.norm(W, 2)


# ------------------------------------------------------------------------------------------------
# a posteriori verification
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sound_against_sampled_jacobians(seed):
    ws = _rand_net([5, 20, 20, 3], 100 + seed, scale=1.5)
    r = lipsdp(ws)
    assert r.sound
    assert _sampled_jacobian_max(ws, n=3000, seed=seed) <= r.value <= product_bound(ws)
    lam, scale = _lmi_max_eig(ws, r)
    assert lam <= 1e-12 * scale


def test_loose_solver_tolerance_is_still_sound():
    """A very loose solve (tol 1e-2, no polishing) gives a looser but still verified bound."""
    ws = _rand_net([4, 12, 12, 2], 7)
    loose = lipsdp(ws, tol=1e-2, polish=False)
    tight = lipsdp(ws)
    lam, scale = _lmi_max_eig(ws, loose)
    assert lam <= 1e-12 * scale
    assert loose.value >= tight.value * (1 - 1e-6)
    assert loose.value >= _sampled_jacobian_max(ws, n=2000)


def test_verify_multipliers():
    ws = _rand_net([3, 4, 4, 1], 5)
    r = lipsdp(ws)
    again = verify_multipliers(ws, r.multipliers[0])
    assert again == pytest.approx(r.value, rel=1e-9)
    patterns = _pattern_max(ws)
    # arbitrary multipliers certify *something*, never less than the pattern maximum
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(20):
        ts = [rng.uniform(0.5, 20.0, 4), rng.uniform(0.5, 20.0, 4)]
        v = verify_multipliers(ws, ts)
        if v is not None:
            hits += 1
            assert v >= patterns
            assert v >= r.value * (1 - 1e-6)
    assert hits > 0
    # multipliers far too small: the hidden block is not negative definite -> no certificate
    assert verify_multipliers(ws, [np.full(4, 1e-9), np.full(4, 1e-9)]) is None
    # negative multipliers are clipped, scalars broadcast (layer form)
    assert verify_multipliers(ws, [5.0, 5.0]) is None or verify_multipliers(ws, [5.0, 5.0]) >= patterns


def test_clarabel_agrees_with_scs():
    pytest.importorskip("cvxpy")
    ws = _rand_net([3, 6, 5, 2], 11)
    a = lipsdp(ws)
    b = lipsdp(ws, solver="CLARABEL", tol=1e-8)
    assert a.sound and b.sound
    assert "CLARABEL" in b.method
    assert a.value == pytest.approx(b.value, rel=1e-4)


# ------------------------------------------------------------------------------------------------
# splitting
# ------------------------------------------------------------------------------------------------


def test_split_network_structure():
    ws = _rand_net([3, 10, 10, 10, 2], 0)  # 4 matrices, 3 hidden layers of 10
    assert [len(c) for c in split_network(ws, 100)] == [4]
    assert [len(c) for c in split_network(ws, 20)] == [3, 1]  # layers 1-2 | cut at layer 3 | W_3
    assert [len(c) for c in split_network(ws, 10)] == [2, 2]  # layer 1 | cut at layer 2 | layer 3
    assert [len(c) for c in split_network(ws, 0)] == [1, 1, 1, 1]
    chunks = split_network(ws, 10)
    assert sum(len(c) for c in chunks) == len(ws)


def test_split_is_looser_but_below_product():
    ws = _rand_net([4, 15, 15, 15, 3], 21, scale=1.3)
    full = lipsdp(ws)
    prod = product_bound(ws)
    for m in (30, 15):
        sp = lipsdp(ws, max_neurons_per_block=m)
        assert sp.sound
        assert len(sp.parts) > 1
        assert "split" in sp.method
        assert full.value <= sp.value * (1 + 1e-4)
        assert sp.value <= prod * (1 + 1e-9)
        assert sp.value == pytest.approx(float(np.prod(sp.parts)), rel=1e-12)
    zero = lipsdp(ws, max_neurons_per_block=0)
    assert zero.value == pytest.approx(prod, rel=1e-5)


def test_default_split_for_large_networks():
    ws = _rand_net([3, 160, 160, 2], 4)
    r = lipsdp(ws, form="layer", solver="direct")
    assert len(r.parts) == 2  # 320 hidden neurons > 300: split by default
    assert r.sound and r.value <= product_bound(ws)


# ------------------------------------------------------------------------------------------------
# input checking
# ------------------------------------------------------------------------------------------------


def test_rejects_bad_input():
    ws = _rand_net([3, 4, 2], 0)
    with pytest.raises(UserInputError, match="network"):
        lipsdp(ws, form="network")
    with pytest.raises(UserInputError):
        lipsdp(ws, form="bogus")
    with pytest.raises(UserInputError):
        lipsdp(ws, alpha=1.0, beta=1.0)
    with pytest.raises(UserInputError, match="columns"):
        lipsdp([np.ones((4, 3)), np.ones((2, 5))])
    with pytest.raises(UserInputError):
        lipsdp([np.ones((4, 3)) * np.nan, np.ones((2, 4))])
    with pytest.raises(UserInputError):
        lipsdp([])


def test_zero_network():
    r = lipsdp([np.zeros((4, 3)), np.ones((2, 4))])
    assert r.value == 0.0 and r.sound


@pytest.mark.parametrize("form", ["layer", "neuron"])
def test_direct_solver(form):
    """No SDP solver: quasi-Newton on the exact rho_min(T).  Sound always; layer form matches SCS."""
    ws = _rand_net([4, 10, 10, 2], 8)
    d = lipsdp(ws, form=form, solver="direct")
    s = lipsdp(ws, form=form)
    assert d.sound and "direct" in d.method
    lam, scale = _lmi_max_eig(ws, d)
    assert lam <= 1e-12 * scale
    assert d.value >= s.value * (1 - 1e-4)
    if form == "layer":
        assert d.value == pytest.approx(s.value, rel=1e-4)
    else:
        assert d.value <= s.value * 1.05
    assert _sampled_jacobian_max(ws, n=2000) <= d.value


def _independent_cvxpy_lipsdp(ws, alpha, beta):
    """LipSDP-Neuron written block by block in cvxpy (independent of lipverify's sparse assembly)."""
    cp = pytest.importorskip("cvxpy")
    L = len(ws) - 1
    sizes = [ws[0].shape[1]] + [w.shape[1] for w in ws[1:]]
    rho = cp.Variable(nonneg=True)
    T = [cp.diag(cp.Variable(n, nonneg=True)) for n in sizes[1:]]
    blocks = [[np.zeros((sizes[i], sizes[j])) for j in range(L + 1)] for i in range(L + 1)]
    blocks[0][0] = -rho * np.eye(sizes[0])
    for k in range(1, L + 1):
        W = ws[k - 1]
        blocks[k - 1][k - 1] = blocks[k - 1][k - 1] - 2 * alpha * beta * W.T @ T[k - 1] @ W
        blocks[k - 1][k] = (alpha + beta) * W.T @ T[k - 1]
        blocks[k][k - 1] = (alpha + beta) * T[k - 1] @ W
        blocks[k][k] = blocks[k][k] - 2 * T[k - 1]
    blocks[L][L] = blocks[L][L] + ws[L].T @ ws[L]
    M = cp.bmat(blocks)
    prob = cp.Problem(cp.Minimize(rho), [(M + M.T) / 2 << 0])
    prob.solve(solver="CLARABEL")
    return math.sqrt(rho.value)


@pytest.mark.parametrize("alpha,beta", [(0.0, 1.0), (0.2, 1.0), (-0.5, 0.5)])
def test_matches_independent_cvxpy_model(alpha, beta):
    ws = _rand_net([3, 5, 4, 2], 31)
    ref = _independent_cvxpy_lipsdp(ws, alpha, beta)
    r = lipsdp(ws, alpha=alpha, beta=beta)
    assert r.sound
    assert r.value >= ref * (1 - 1e-6)
    assert r.value == pytest.approx(ref, rel=1e-4)
