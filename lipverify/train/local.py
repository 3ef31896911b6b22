"""Local-Lipschitz training (Huang et al. 2021, SPEC sections 4 and 7), differentiable.

For a batch of inputs ``x_b`` and the training radius ``eps``, :class:`LocalBound` computes on the
Lipschitz graph of the network being trained:

1. **Bounds on the ball** ``B_2(x_b, eps)`` for every node, differentiable in the weights and in the
   learned thresholds: the first linear node exactly (``v_k(x) ± eps ||row_k||_2``), later linear nodes by
   interval bound propagation around the node's own value (``v(x) + A (c - h(x)) ± |A| r``), intersected
   with the Lipschitz-ball bound ``v_k(x) ± eps L(h) ||row_k||_2`` (``L(h)`` the global estimate);
   activations, MinMax, max pooling, sums and concatenations as in :mod:`lipverify.bounds.local`.
2. **Varying units** (no gradient): a ReLU unit is constant when ``ub <= 0``; a clipped unit
   ``min(relu(z), theta)`` also when ``lb >= theta``.
3. **Masked operator norms** ``||I_out A I_in||_2`` per example by power iteration with *per-example*
   vectors that persist across epochs (one per training example and linear operator, stored in
   float16: they only warm-start the iteration, Huang et al. section 3.3), a few iterations per step
   under ``no_grad``, then ``||I_out A I_in u||`` with gradient.
4. **Local margin constants** ``K_yi(x) = ||(T_y - T_i) I_h||_2 L_loc(h)`` from the last affine map,
   clamped to the global ``K_yi``; loss: cross-entropy on the worst-case logits ``f_i + eps K_yi(x)``
   (``i != y``) plus ``sparsity_weight`` times the sparsity loss ``max(0, ub) + max(0, theta - lb)`` of the
   clipped ReLUs' pre-activations (mean over units and inputs).

Everything here is a training-time estimate (power iteration, float32); the exported model is
re-verified by :func:`lipverify.load` and the sound certifiers.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lipverify.bounds.global_bound import combine_lipschitz
from lipverify.graph import minmax
from lipverify.graph.linear_ops import Chain, Conv, Dense, Scale, Select
from lipverify.train.losses import worst_case_ce
from lipverify.train.trainable import GloroBound, operator_rows, unit_vector


def live_sq_row_norms(op) -> torch.Tensor | None:
    """Squared l2 norms of the rows of ``op`` (shape ``out_shape``), differentiable in the weights, when
    ``op`` is a chain of element-wise scales and coordinate selections around at most one dense or
    convolution operator (then they are exact); ``None`` otherwise."""
    ops = op.ops if isinstance(op, Chain) else [op]
    dev = op._device()
    dt = next((o.weight.dtype for o in ops if isinstance(o, (Dense, Conv))), torch.float32)
    d = torch.ones(ops[0].in_shape, dtype=dt, device=dev)
    mixed = False
    for o in ops:
        if isinstance(o, Scale):
            d = d * o.scale.to(dt) ** 2
        elif isinstance(o, Select):
            if not mixed and o.multiplicity > 1:
                return None
            d = o.apply(d[None])[0]
        elif isinstance(o, (Dense, Conv)):
            if mixed:
                return None
            mixed = True
            w2 = o.weight * o.weight
            d = d @ w2.T if isinstance(o, Dense) else o._conv_with(d[None], w2)[0]
        else:
            return None
    return d


def make_probe(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s submodules that returns the values of the named nodes."""
    g = fx.Graph()
    env: dict = {}
    out_val = g.graph_copy(gm.graph, env, return_output_node=True)
    del out_val
    by_name = {n.name: env[n] for n in gm.graph.nodes if n in env}
    for n in list(g.nodes):
        if n.op == "output":
            g.erase_node(n)
    g.output(tuple(by_name[nm] for nm in names))
    return fx.GraphModule(gm, g)


class LocalBound(nn.Module):
    def __init__(self, bound: GloroBound, gm: fx.GraphModule, normalizer, n_examples: int,
                 power_iters: int = 1, sparsity_weight: float = 0.0, store_dtype=torch.float16):
        super().__init__()
        self.bound = bound
        self.normalizer = normalizer
        self.power_iters = int(power_iters)
        self.sparsity_weight = float(sparsity_weight)
        self.store_dtype = store_dtype
        graph = bound.graph
        self.graph = graph
        nodes = graph.nodes
        self.out = graph.output
        gm_names = {n.name for n in gm.graph.nodes}
        # graph node -> fx node whose value it is
        self.src: dict[int, str | None] = {}
        for i, n in enumerate(nodes):
            if n.kind == "input":
                self.src[i] = None
            elif n.name == "normalize" and n.sources == ["normalize"]:
                self.src[i] = "__gm_input__"
            else:
                cand = [s for s in n.sources if s in gm_names]
                if not cand:
                    raise ValueError(f"graph node {n.name} has no source in the model")
                self.src[i] = cand[-1]
        placeholder = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
        names = sorted({s for s in self.src.values() if s not in (None, "__gm_input__")})
        self._names = names
        self._placeholder = placeholder
        self.probe = make_probe(gm, names)
        cons = graph.consumers()
        # rows mask of each linear node: varying set at the end of its chain of activation consumers
        self.row_mask_node: dict[int, int | None] = {}
        for i, n in enumerate(nodes):
            if n.kind != "linear" or i == self.out:
                continue
            j, end = i, None
            while len(cons[j]) == 1 and nodes[cons[j][0]].kind == "activation":
                j = cons[j][0]
                end = j
            self.row_mask_node[i] = end
        self.vectors: dict[int, torch.Tensor] = {}
        self.filled: dict[int, torch.Tensor] = {}
        dev = bound._device()
        for i in self.row_mask_node:
            if i in bound.live:
                self.vectors[i] = torch.zeros((n_examples,) + nodes[i].op.in_shape, dtype=store_dtype, device=dev)
                self.filled[i] = torch.zeros(n_examples, dtype=torch.bool, device=dev)
        # activations with learned thresholds (min(x, theta) after a ReLU): sparsity loss
        self.clip_nodes = [i for i, n in enumerate(nodes) if n.kind == "activation"
                           and isinstance(n.op.const_above, nn.Parameter)]

    # -- per-example state (checkpointed with the run) ------------------------------------------------
    def vector_state(self) -> dict:
        return {"vectors": {k: v.cpu() for k, v in self.vectors.items()},
                "filled": {k: v.cpu() for k, v in self.filled.items()}}

    def load_vector_state(self, st: dict) -> None:
        for k, v in st["vectors"].items():
            self.vectors[int(k)].copy_(v)
        for k, v in st["filled"].items():
            self.filled[int(k)].copy_(v)

    # -- forward --------------------------------------------------------------------------------------
    def node_values(self, x: torch.Tensor) -> list:
        z = self.normalizer(x) if self.normalizer is not None else x
        outs = self.probe(z)
        by = dict(zip(self._names, outs))
        vals = []
        for i in range(len(self.graph.nodes)):
            s = self.src[i]
            vals.append(x if s is None else z if s == "__gm_input__" else by[s])
        return vals

    def bounds(self, x, vals, eps, L_glob):
        nodes = self.graph.nodes
        lbs, ubs, var = [None] * len(nodes), [None] * len(nodes), [None] * len(nodes)
        for i, n in enumerate(nodes):
            k = n.kind
            if k == "input":
                lbs[i], ubs[i] = x - eps, x + eps
                var[i] = torch.ones_like(x, dtype=torch.bool)
                continue
            j = n.inputs[0]
            if k == "linear":
                op = n.op
                v = vals[i]
                rn2 = live_sq_row_norms(op)
                if j == 0 and rn2 is not None:
                    r = eps * rn2.clamp_min(0).sqrt()
                    lb, ub = v - r, v + r
                else:
                    c = (lbs[j] + ubs[j]) / 2
                    rad = (ubs[j] - lbs[j]) / 2
                    cen = v + op.apply(c - vals[j])
                    r = op.abs_apply(rad)
                    lb, ub = cen - r, cen + r
                    if rn2 is not None and L_glob[j] is not None:
                        rl = eps * L_glob[j] * rn2.clamp_min(0).sqrt()
                        lb, ub = torch.maximum(lb, v - rl), torch.minimum(ub, v + rl)
                with torch.no_grad():
                    var[i] = op.abs_apply(var[j].to(v.dtype)) > 0
            elif k == "activation":
                act = n.op
                zl, zu = lbs[j], ubs[j]
                if act.lo >= 0:
                    lb, ub = act.fn(zl), act.fn(zu)
                else:
                    c, r = (zl + zu) / 2, (zu - zl) / 2
                    mid = act.fn(c)
                    lb, ub = mid - act.lipschitz * r, mid + act.lipschitz * r
                with torch.no_grad():
                    vm = var[j].clone()
                    if act.const_below is not None:
                        vm &= ~(zu <= act.const_below)
                    if act.const_above is not None:
                        vm &= ~(zl >= act.const_above)
                    var[i] = vm
            elif k == "minmax":
                lb, ub = minmax(lbs[j]), minmax(ubs[j])
                with torch.no_grad():
                    b, c = var[j].shape[0], var[j].shape[1]
                    pv = var[j].reshape(b, c // 2, 2, *var[j].shape[2:]).any(2, keepdim=True)
                    var[i] = pv.expand(b, c // 2, 2, *var[j].shape[2:]).reshape(var[j].shape)
            elif k == "maxpool":
                lb, ub = n.op(lbs[j]), n.op(ubs[j])
                with torch.no_grad():
                    var[i] = n.op(var[j].to(lb.dtype)) > 0
            elif k == "add":
                lb = ub = 0
                vm = None
                for co, jj in zip(n.op, n.inputs):
                    lo_, hi_ = (lbs[jj], ubs[jj]) if co >= 0 else (ubs[jj], lbs[jj])
                    lb = lb + co * lo_
                    ub = ub + co * hi_
                    vm = var[jj] if vm is None else (vm | var[jj])
                var[i] = vm
            elif k == "concat":
                lb = torch.cat([lbs[jj] for jj in n.inputs], dim=n.op + 1)
                ub = torch.cat([ubs[jj] for jj in n.inputs], dim=n.op + 1)
                var[i] = torch.cat([var[jj] for jj in n.inputs], dim=n.op + 1)
            else:
                raise ValueError(k)
            # every node also lies in v(x) ± eps L(v) (coordinate-wise)
            if L_glob[i] is not None and k != "linear":
                lb = torch.maximum(lb, vals[i] - eps * L_glob[i])
                ub = torch.minimum(ub, vals[i] + eps * L_glob[i])
            lbs[i], ubs[i] = lb, ub
        return lbs, ubs, var

    def masked_norms(self, idx: torch.Tensor, var, ctx=None) -> dict[int, torch.Tensor]:
        nodes = self.graph.nodes
        sig = {}
        for i, end in self.row_mask_node.items():
            op = nodes[i].op
            j = nodes[i].inputs[0]
            if i not in self.bound.live:
                sig[i] = None
                continue
            dt = GloroBound._dtype(op)
            mi = var[j].to(dt)
            mo = var[end].to(dt) if end is not None else None
            with torch.no_grad():
                store = self.vectors[i]
                u = store[idx].to(dt)
                fresh = ~self.filled[i][idx]
                if bool(fresh.any()):
                    g = self.bound._u(i).to(dt).expand_as(u)
                    u = torch.where(fresh.view((-1,) + (1,) * (u.dim() - 1)), g, u)
                for _ in range(self.power_iters):
                    w = op.apply(u * mi)
                    if mo is not None:
                        w = w * mo
                    u = unit_vector(op.adjoint(w) * mi + 1e-30)
            w = op.apply(u.detach() * mi)
            if mo is not None:
                w = w * mo
            sig[i] = w.reshape(w.shape[0], -1).norm(dim=1)
            new = u.detach().to(self.store_dtype)
            if ctx is not None and ctx.enabled:
                new = ctx.all_gather(new)
                all_idx = ctx.all_gather(idx)
            else:
                all_idx = idx
            with torch.no_grad():
                store[all_idx] = new
                self.filled[i][all_idx] = True
        return sig

    def forward(self, x, y, eps, idx, ctx=None):
        """Loss, logits and the local margin rows ``K_y`` (``(B, m)``) for a batch."""
        vals = self.node_values(x)
        logits = vals[self.out].reshape(x.shape[0], -1)
        Lg = self.bound.node_lipschitz(skip_output=True)
        eps_t = float(eps)
        lbs, ubs, var = self.bounds(x, vals, eps_t, Lg)
        sig = self.masked_norms(idx, var, ctx)
        nodes = self.graph.nodes
        B = x.shape[0]
        Lloc: list = [None] * len(nodes)
        for i, n in enumerate(nodes):
            k = n.kind
            if k == "input":
                Lloc[i] = torch.ones(B, device=x.device)
                continue
            ins = [Lloc[j] for j in n.inputs]
            if k == "linear":
                if i == self.out:
                    continue
                s = sig.get(i)
                if s is None:
                    s = self.bound.sigma(i) if i in self.bound.live else self.bound.const[i]
                Lloc[i] = combine_lipschitz(n, ins, s)
            else:
                Lloc[i] = combine_lipschitz(n, ins)
        out = nodes[self.out]
        Kg = self.bound.margin_constants()
        if out.kind == "linear":
            h = out.inputs[0]
            T = operator_rows(out.op)  # (m, d)
            mh = var[h].reshape(B, -1).to(T.dtype)
            diff = T[y][:, None, :] - T[None, :, :]  # (B, m, d)
            Ky = ((diff * diff) * mh[:, None, :]).sum(-1).clamp_min(1e-30).sqrt() * Lloc[h][:, None]
        else:
            Ky = math.sqrt(2.0) * Lloc[self.out][:, None].expand(B, self.bound.m)
        Ky = torch.minimum(Ky, Kg[y])
        loss = worst_case_ce(logits, y, Ky, eps_t)
        sp = logits.new_zeros(())
        if self.clip_nodes and self.sparsity_weight > 0:
            terms = []
            for i in self.clip_nodes:
                theta = nodes[i].op.const_above
                # the clipped unit's input is a ReLU output; its pre-activation bounds are one node up
                j = nodes[i].inputs[0]
                pre = nodes[j].inputs[0] if nodes[j].kind == "activation" else j
                zl, zu = lbs[pre], ubs[pre]
                terms.append((F.relu(zu) + F.relu(theta - zl)).mean())
            sp = sum(terms) / len(terms)
            loss = loss + self.sparsity_weight * sp
        return loss, logits, Ky, sp
