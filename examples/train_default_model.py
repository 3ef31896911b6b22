"""Train the embedded default model of lipverify (2C2F ReLU on MNIST) and write its artefacts.

Usage (from the repository root)::

    python examples/train_default_model.py                    # defaults below
    python examples/train_default_model.py --data PATH --eval-data PATH --out DIR --seed 0

Writes ``DIR/default_mnist.pt`` (a plain state_dict of ``lipverify.models.zoo.c2f2()``) and
``DIR/default_samples.npz`` (the first 32 images ``x`` (32,1,28,28) float32 and labels ``y`` int64 of
the *evaluation* set, i.e. MNIST test images 0-31).

Training: Adam on a minimal GloRo-style loss (Leino, Wang and Fredrikson, "Globally-robust neural
networks", ICML 2021).  Write the network as ``f(x) = W h(x) + b`` where ``h`` is everything before
the last dense layer.  An l2 Lipschitz estimate of ``h`` is the product of the spectral norms of its
affine layers (ReLU is 1-Lipschitz),

    L_h ~= sigma(conv1) * sigma(conv2) * sigma(dense1),

each estimated by power iteration with a persistent vector per layer (a few iterations per step,
warm-started from the previous step, then ``sigma = ||A u|| / ||u||`` differentiated with respect to
the weights).  The margin ``f_y - f_i`` is then ``K_yi = ||W_y - W_i||_2 * L_h``-Lipschitz, and the
loss is the cross-entropy on the logits

    z_i = f_i(x) + eps * K_yi   (i != y),      z_y = f_y(x),

i.e. the true-class logit is lowered, relative to every other class, by the largest amount an l2
perturbation of size eps could move that margin.  Minimising it pushes the margins above
``eps * K_yi`` (GloRo's certification condition) while keeping ``L_h`` small.  ``eps`` ramps linearly
from 0 to ``--eps`` over the first half of training (GloRo and LiResNet both train with an eps above
the test eps; the default 0.45 = 1.5 x the MNIST 2C2F test eps 0.3 of the GloRo paper).

Power iteration approaches the spectral norm from *below*: the numbers printed at the end are
estimates with many iterations, not certificates; lipverify's sound bounds are what certify.

Runs single-threaded by default (``--threads``) and in well under two minutes on one CPU core; the
result is deterministic for a given seed, thread count and torch build.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))

from lipverify.models.zoo import DEFAULT_MODEL_FILE, DEFAULT_SAMPLES_FILE, c2f2  # noqa: E402

N_SAMPLES = 32


class PowerIteration:
    """Persistent power-iteration vectors for the linear part of Conv2d / Linear layers."""

    def __init__(self, layer: nn.Module, in_shape: tuple[int, ...], generator: torch.Generator):
        self.layer = layer
        self.u = torch.randn((1, *in_shape), generator=generator)
        self.u /= self.u.norm()
        if isinstance(layer, nn.Conv2d):
            out = self._apply(self.u, layer.weight)
            # output_padding so that the transposed conv returns exactly the input shape
            h_in, w_in = in_shape[1:]
            (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
            self.output_padding = (
                h_in - ((out.shape[2] - 1) * sh - 2 * ph + kh),
                w_in - ((out.shape[3] - 1) * sw - 2 * pw + kw),
            )

    def _apply(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(u, weight, None, layer.stride, layer.padding)
        return F.linear(u, weight)

    def _adjoint(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            return F.conv_transpose2d(
                v, weight, None, layer.stride, layer.padding, self.output_padding
            )
        return v @ weight

    def sigma(self, iterations: int) -> torch.Tensor:
        """Run ``iterations`` steps of ``u <- A^T A u / ||.||`` (no grad), return ``||A u||`` (with grad)."""
        w = self.layer.weight
        with torch.no_grad():
            u = self.u
            for _ in range(iterations):
                u = self._adjoint(self._apply(u, w), w)
                u = u / u.norm().clamp_min(1e-30)
            self.u = u
        return self._apply(self.u, w).norm()


def load_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as d:
        x = torch.from_numpy(np.asarray(d["x"], dtype=np.float32))
        y = torch.from_numpy(np.asarray(d["y"], dtype=np.int64))
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise SystemExit(f"{path}: expected x of shape (N, 1, 28, 28), got {tuple(x.shape)}")
    return x, y


def lipschitz_parts(iters: dict[str, PowerIteration], n: int):
    """``(L_h, [sigma_l])``: product of the estimated spectral norms of the layers before the head."""
    sigmas = [pi.sigma(n) for pi in iters.values()]
    return torch.stack(sigmas).prod(), sigmas


def margin_constants(head: nn.Linear, l_h: torch.Tensor) -> torch.Tensor:
    """``K[j, i] = ||W_j - W_i||_2 * L_h`` (m x m, zero diagonal)."""
    w = head.weight
    diff = w.unsqueeze(0) - w.unsqueeze(1)  # [j, i, :] = W_i - W_j
    off_diag = 1.0 - torch.eye(w.shape[0], dtype=w.dtype)
    return diff.pow(2).sum(-1).add(1e-12).sqrt() * off_diag * l_h


def evaluate(model, x, y, k, eps_list, batch=500):
    """Clean accuracy and (estimated) GloRo verified-robust accuracy at each l2 eps."""
    correct = 0
    vra = {e: 0 for e in eps_list}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(x[i : i + batch])
            yb = y[i : i + batch]
            pred = logits.argmax(1)
            ok = pred == yb
            correct += int(ok.sum())
            margins = logits.gather(1, pred[:, None]) - logits  # f_j - f_i
            kp = k[pred]  # K[j, i]
            kp = kp.scatter(1, pred[:, None], 0.0)  # exclude the argmax index (only)
            margins = margins.scatter(1, pred[:, None], float("inf"))
            for e in eps_list:
                cert = (margins > e * kp).all(1)
                vra[e] += int((cert & ok).sum())
    n = len(x)
    return correct / n, {e: v / n for e, v in vra.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "data" / "data" / "mnist_train_5k.npz",
        help="training npz with x (N,1,28,28) float32 in [0,1] and y int64 "
        "(default: ../shared/data/data/mnist_train_5k.npz from the repository root)",
    )
    ap.add_argument(
        "--eval-data",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "data" / "data" / "mnist_test_1000.npz",
        help="evaluation npz (default: ../shared/data/data/mnist_test_1000.npz); its first 32 "
        "images become default_samples.npz",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "lipverify" / "models",
        help="output directory (default: lipverify/models/)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine decay to 0)")
    ap.add_argument("--eps", type=float, default=0.45, help="training l2 eps (after the ramp)")
    ap.add_argument("--power-iters", type=int, default=2, help="power iterations per step")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_tr, y_tr = load_npz(args.data)
    x_ev, y_ev = load_npz(args.eval_data)
    print(f"train {tuple(x_tr.shape)} from {args.data}; eval {tuple(x_ev.shape)} from {args.eval_data}")

    model = c2f2(in_ch=1, in_size=28, n_classes=10, activation="relu")
    conv1, conv2, dense1, head = model[0], model[2], model[5], model[7]
    iters = {
        "conv1": PowerIteration(conv1, (1, 28, 28), gen),
        "conv2": PowerIteration(conv2, (16, 14, 14), gen),
        "dense1": PowerIteration(dense1, (32 * 7 * 7,), gen),
    }
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n = len(x_tr)
    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    ramp_steps = max(1, total_steps // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + np.cos(np.pi * min(t, total_steps) / total_steps))
    )

    t0 = time.time()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot_loss = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            eps = args.eps * min(1.0, step / ramp_steps)
            l_h, _ = lipschitz_parts(iters, args.power_iters)
            k = margin_constants(head, l_h)  # (10, 10)
            logits = model(xb)
            shift = eps * k[yb]  # K[y, i], zero at i = y
            loss = F.cross_entropy(logits + shift, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += float(loss.detach()) * len(idx)
            step += 1
        model.eval()
        with torch.no_grad():
            l_h, sig = lipschitz_parts(iters, 10)
            k = margin_constants(head, l_h)
        acc, _ = evaluate(model, x_ev, y_ev, k, [])
        print(
            f"epoch {epoch + 1:2d}/{args.epochs} loss {tot_loss / n:.4f} eps {eps:.3f} "
            f"L_h~{float(l_h):.3f} eval acc {acc:.4f} ({time.time() - t0:.1f}s)"
        )

    # Final report with well-converged power iteration (still an estimate from below).
    model.eval()
    with torch.no_grad():
        l_h, sig = lipschitz_parts(iters, 500)
        sig_head = PowerIteration(head, (100,), gen).sigma(500)
        k = margin_constants(head, l_h)
    acc, vra = evaluate(model, x_ev, y_ev, k, [0.1, 0.3, 0.5, 1.0])
    names = list(iters) + ["dense2"]
    sig_all = [float(s) for s in sig] + [float(sig_head)]
    print("spectral norms (power iteration): " + ", ".join(f"{a} {s:.4f}" for a, s in zip(names, sig_all)))
    print(f"product of layer spectral norms ~ {float(np.prod(sig_all)):.4f}")
    print(f"clean accuracy on the eval set ({len(x_ev)} images): {acc:.4f}")
    print("estimated l2 VRA (GloRo margins): " + ", ".join(f"eps {e}: {v:.3f}" for e, v in vra.items()))

    args.out.mkdir(parents=True, exist_ok=True)
    state = {key: v.detach().clone().contiguous() for key, v in model.state_dict().items()}
    torch.save(state, args.out / DEFAULT_MODEL_FILE)
    xs = np.round(x_ev[:N_SAMPLES].numpy().astype(np.float64) * 255.0) / 255.0
    np.savez_compressed(
        args.out / DEFAULT_SAMPLES_FILE,
        x=xs.astype(np.float32),
        y=y_ev[:N_SAMPLES].numpy().astype(np.int64),
    )
    with torch.no_grad():
        acc32 = float((model(torch.from_numpy(xs.astype(np.float32))).argmax(1) == y_ev[:N_SAMPLES]).float().mean())
    for name in (DEFAULT_MODEL_FILE, DEFAULT_SAMPLES_FILE):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size} bytes)")
    print(f"accuracy on the {N_SAMPLES} shipped samples: {acc32:.4f}; total time {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
