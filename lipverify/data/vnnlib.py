"""Verification-competition specifications: an l-inf box and an output condition per file.

VNN-LIB robustness specifications
    A single ``.vnnlib`` (or ``.vnnlib.gz``) file, or a folder of them (searched recursively, sorted by
    relative path; one example per file). A file declares inputs ``X_i`` and outputs ``Y_j`` as
    ``Real``, bounds each input from both sides with ``(assert (<= X_i v))`` / ``(assert (>= X_i v))``
    (or with the constant first, ``(assert (<= v X_i))``), and states the output condition of a
    *counterexample*. ``X_i`` indexes the row-major flattening of the model's input tensor. Two
    output conditions are understood:

    * untargeted: ``(assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0)) ...))`` -- a counterexample is
      any input in the box where one of the listed classes scores at least the label (here 0). The
      mirrored ``(<= Y_0 Y_1)`` and disjuncts without the ``and`` wrapper mean the same.
    * targeted: a single ``(assert (>= Y_t Y_l))`` or ``(assert (<= Y_l Y_t))`` -- label ``l``,
      target ``t``.

    The box is an l-inf ball around a clean input, clipped to the valid input range, so its midpoint
    is not the clean input where it was clipped. The clean input is recovered per dimension: ``eps``
    is the largest half-width; a dimension whose width is ``2*eps`` gives its midpoint; one whose
    lower bound sits at the range minimum (the smallest lower bound) gives ``ub - eps``; any other
    gives ``lb + eps``. For channel-first inputs ``(C, H, W)`` the rule is applied per channel, so
    that boxes built with per-channel radii (normalisation with a per-channel std outside the
    network) and per-channel valid ranges are recovered exactly; ``eps`` reported per example is
    the largest radius over all channels, and ``lower``/``upper`` keep the exact box.
"""

from __future__ import annotations

import gzip
import math
import re
from pathlib import Path

import numpy as np
import torch

from lipverify.data.dataset import Dataset, check_labels, fmt_shape, oneline
from lipverify.data.properties import OutputProperty
from lipverify.errors import UserInputError

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


_COMMENT_RE = re.compile(r";[^\n]*")


_NEG_RE = re.compile(rf"\(\s*-\s+({_NUM})\s*\)")


_DECL_RE = re.compile(r"\(\s*declare-const\s+([XY])_(\d+)\s+Real\s*\)")


_BOUND_VAR_FIRST_RE = re.compile(rf"\(\s*assert\s+\(\s*(<=|>=)\s+X_(\d+)\s+({_NUM})\s*\)\s*\)")


_BOUND_CONST_FIRST_RE = re.compile(rf"\(\s*assert\s+\(\s*(<=|>=)\s+({_NUM})\s+X_(\d+)\s*\)\s*\)")


_TOKEN_RE = re.compile(r"\(|\)|[^\s()]+")


_VAR_RE = re.compile(r"([XY])_(\d+)")


_NUM_RE = re.compile(_NUM)


_CMP = {"<=", ">=", "<", ">"}


_IGNORED_FORMS = {"check-sat", "exit", "set-logic", "set-info", "set-option"}


_MAX_DISJUNCTS = 10_000


def vnnlib_files(folder: Path) -> list[Path]:
    found = [
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.name.lower().endswith(".vnnlib") or p.name.lower().endswith(".vnnlib.gz"))
    ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _negate_literal(m: re.Match) -> str:
    v = m.group(1)
    if v.startswith("-"):
        return v[1:]
    return "-" + (v[1:] if v.startswith("+") else v)


def read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
    except Exception as exc:
        raise UserInputError(f"cannot read the file ({oneline(exc)})", path=str(path)) from None
    if not raw.strip():
        raise UserInputError("the file is empty", path=str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserInputError("not a text file (VNN-LIB is plain text)", path=str(path)) from None


def _sexprs(text: str, path: Path) -> list:
    """Parse the (small) remainder of a spec into nested lists of string atoms."""
    stack: list[list] = [[]]
    for tok in _TOKEN_RE.findall(text):
        if tok == "(":
            stack.append([])
        elif tok == ")":
            if len(stack) == 1:
                raise UserInputError("syntax error: unbalanced ')'", path=str(path))
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise UserInputError("syntax error: unbalanced '(' (file truncated?)", path=str(path))
    return stack[0]


def _show(expr) -> str:
    if isinstance(expr, list):
        text = "(" + " ".join(_show(e) for e in expr) + ")"
    else:
        text = str(expr)
    return text if len(text) <= 80 else text[:77] + "..."


def _atom_kind(a):
    """('X'|'Y', index) for a variable, ('c', value) for a number, None otherwise."""
    if not isinstance(a, str):
        return None
    m = _VAR_RE.fullmatch(a)
    if m:
        return m.group(1), int(m.group(2))
    if _NUM_RE.fullmatch(a):
        return "c", float(a)
    return None


class _Spec:
    __slots__ = ("n_x", "n_y", "lb", "ub", "label", "targets", "prop")


def parse_vnnlib(path: Path, text: str) -> _Spec:
    text = _COMMENT_RE.sub(" ", text)
    text = _NEG_RE.sub(_negate_literal, text)

    xs: set[int] = set()
    ys: set[int] = set()
    for kind, idx in _DECL_RE.findall(text):
        (xs if kind == "X" else ys).add(int(idx))
    rest = _DECL_RE.sub(" ", text)

    bound_idx: list[int] = []
    bound_val: list[float] = []
    bound_upper: list[bool] = []
    for op, idx, val in _BOUND_VAR_FIRST_RE.findall(rest):
        bound_idx.append(int(idx))
        bound_val.append(float(val))
        bound_upper.append(op == "<=")
    for op, val, idx in _BOUND_CONST_FIRST_RE.findall(rest):
        bound_idx.append(int(idx))
        bound_val.append(float(val))
        bound_upper.append(op == ">=")
    rest = _BOUND_VAR_FIRST_RE.sub(" ", rest)
    rest = _BOUND_CONST_FIRST_RE.sub(" ", rest)

    if not xs:
        raise UserInputError("declares no input variables (declare-const X_i Real)", path=str(path))
    if not ys:
        raise UserInputError("declares no output variables (declare-const Y_j Real)", path=str(path))
    n_y_decl = max(ys) + 1
    outputs: list[list[list[tuple[np.ndarray, float]]]] = []  # one DNF per output assert
    for form in _sexprs(rest, path):
        if not isinstance(form, list):
            raise UserInputError(f"syntax error: unexpected text {_show(form)!r}", path=str(path))
        if not form:
            raise UserInputError("syntax error: empty '()'", path=str(path))
        head = form[0]
        if head in _IGNORED_FORMS:
            continue
        if head == "declare-const":
            raise UserInputError(
                f"unsupported declaration {_show(form)!r}: only 'X_i Real' and 'Y_j Real' are understood",
                path=str(path),
            )
        if head != "assert" or len(form) != 2:
            raise UserInputError(f"syntax error: unexpected form {_show(form)!r}", path=str(path))
        dnf = _interpret_assert(form[1], path, n_y_decl, bound_idx, bound_val, bound_upper)
        if dnf is not None:
            outputs.append(dnf)

    n_x = max(xs) + 1
    n_y = max(ys) + 1
    if len(xs) != n_x:
        raise UserInputError(f"input variables are not numbered X_0 .. X_{n_x - 1} without gaps", path=str(path))
    if len(ys) != n_y:
        raise UserInputError(f"output variables are not numbered Y_0 .. Y_{n_y - 1} without gaps", path=str(path))

    idx = np.asarray(bound_idx, dtype=np.int64)
    val = np.asarray(bound_val, dtype=np.float64)
    upper = np.asarray(bound_upper, dtype=bool)
    if idx.size and int(idx.max()) >= n_x:
        raise UserInputError(f"bound on undeclared input X_{int(idx.max())}", path=str(path))
    if not np.isfinite(val).all():
        raise UserInputError("an input bound is not a finite number", path=str(path))
    lb = np.full(n_x, -np.inf)
    ub = np.full(n_x, np.inf)
    np.maximum.at(lb, idx[~upper], val[~upper])
    np.minimum.at(ub, idx[upper], val[upper])
    for arr, side in ((lb, "lower"), (ub, "upper")):
        missing = np.flatnonzero(~np.isfinite(arr))
        if missing.size:
            more = f" and {missing.size - 1} more" if missing.size > 1 else ""
            raise UserInputError(f"no {side} bound for X_{int(missing[0])}{more}", path=str(path))
    empty = np.flatnonzero(lb > ub)
    if empty.size:
        i = int(empty[0])
        raise UserInputError(
            f"empty box: X_{i} has lower bound {lb[i]!r} above upper bound {ub[i]!r}", path=str(path)
        )

    if not outputs:
        raise UserInputError("no output condition (assert over Y_j)", path=str(path))
    dnf = outputs[0]
    for more in outputs[1:]:  # several asserts are a conjunction: distribute over the disjuncts
        dnf = _conjoin(dnf, more, path)
    prop = OutputProperty.from_dnf(dnf)
    label = prop.label
    targets = prop.targets

    spec = _Spec()
    spec.n_x, spec.n_y, spec.lb, spec.ub, spec.label, spec.targets = n_x, n_y, lb, ub, label, targets
    spec.prop = prop
    return spec


def _interpret_assert(body, path: Path, n_y: int, bound_idx, bound_val, bound_upper):
    """Input bounds (top-level comparisons of ``X_i`` with a number, also inside a top-level ``and``)
    are appended to the bound lists; the rest of the assertion is returned as a DNF of output
    constraints ``(c, d)`` meaning ``c . Y >= d`` (None when the assertion has no output part)."""
    items = body[1:] if isinstance(body, list) and body and body[0] == "and" else [body]
    dnf: list[list[tuple[np.ndarray, float]]] | None = None
    for item in items:
        bound = _input_bound(item)
        if bound is not None:
            bound_idx.append(bound[0])
            bound_val.append(bound[1])
            bound_upper.append(bound[2])
            continue
        part = _dnf(item, path, n_y)
        dnf = part if dnf is None else _conjoin(dnf, part, path)
    return dnf


def _conjoin(a: list, b: list, path: Path) -> list:
    """The DNF of ``A and B`` from the DNFs of ``A`` and ``B`` (every pair of disjuncts), size-capped."""
    if len(a) * len(b) > _MAX_DISJUNCTS:
        raise UserInputError(f"the output condition expands to more than {_MAX_DISJUNCTS} disjuncts", path=str(path))
    return [x + y for x in a for y in b]


def _input_bound(expr):
    """(i, value, is_upper) for ``(<= X_i v)`` / ``(>= v X_i)`` and the like; None otherwise."""
    if not (isinstance(expr, list) and len(expr) == 3 and expr[0] in _CMP):
        return None
    op, a, b = expr
    ka, kb = _atom_kind(a), _atom_kind(b)
    if ka is None or kb is None:
        return None
    ge = op in (">=", ">")
    if ka[0] == "X" and kb[0] == "c":
        return ka[1], kb[1], not ge
    if ka[0] == "c" and kb[0] == "X":
        return kb[1], ka[1], ge
    return None


def _dnf(expr, path: Path, n_y: int) -> list[list[tuple[np.ndarray, float]]]:
    """Disjunctive normal form of an output condition built from ``or``, ``and`` and linear comparisons."""
    if not (isinstance(expr, list) and expr):
        raise UserInputError(f"unsupported assertion {_show(expr)!r}", path=str(path))
    head = expr[0]
    if head == "or":
        if len(expr) == 1:
            raise UserInputError("unsupported output condition: empty (or)", path=str(path))
        out = []
        for d in expr[1:]:
            out.extend(_dnf(d, path, n_y))
            if len(out) > _MAX_DISJUNCTS:
                raise UserInputError(
                    f"the output condition has more than {_MAX_DISJUNCTS} disjuncts", path=str(path)
                )
        return out
    if head == "and":
        out: list[list[tuple[np.ndarray, float]]] = [[]]
        for c in expr[1:]:
            if _input_bound(c) is not None:
                raise UserInputError(
                    f"unsupported condition {_show(expr)!r}: input bounds inside an output disjunction "
                    "(several input regions in one file) are not supported; write one file per region",
                    path=str(path),
                )
            out = _conjoin(out, _dnf(c, path, n_y), path)
        return out
    if head in _CMP:
        if len(expr) != 3:
            raise UserInputError(f"syntax error in {_show(expr)!r}", path=str(path))
        if _input_bound(expr) is not None:
            raise UserInputError(
                f"unsupported condition {_show(expr)!r}: input bounds inside an output disjunction are "
                "not supported",
                path=str(path),
            )
        if any(_atom_kind(a) is None for a in _atoms(expr[1:])):
            raise UserInputError(f"syntax error in {_show(expr)!r}", path=str(path))
        la, ca = _linear(expr[1], path, n_y, expr)
        lb_, cb = _linear(expr[2], path, n_y, expr)
        # a >= b  <=>  (a - b) >= 0 ; a <= b  <=>  (b - a) >= 0
        c, const = (la - lb_, ca - cb) if head in (">=", ">") else (lb_ - la, cb - ca)
        if not np.any(c):
            raise UserInputError(
                f"output condition {_show(expr)!r} does not depend on any output (it compares Y_j with itself "
                "or numbers with numbers)",
                path=str(path),
            )
        return [[(c, -float(const))]]
    raise UserInputError(
        f"unsupported assertion {_show(expr)!r}: expected input bounds, or output conditions made of "
        "(or ...), (and ...) and linear comparisons of Y_j",
        path=str(path),
    )


def _atoms(expr):
    """The operand atoms of a term (the function symbol at the head of a list is skipped)."""
    for e in expr:
        if isinstance(e, list):
            yield from _atoms(e[1:])
        else:
            yield e


def _linear(expr, path: Path, n_y: int, whole) -> tuple[np.ndarray, float]:
    """``(coefficients over Y, constant)`` of a linear term: ``Y_j``, numbers, ``+``, ``-``, ``*`` by a number."""
    if isinstance(expr, str):
        k = _atom_kind(expr)
        if k is None:
            raise UserInputError(f"syntax error in {_show(whole)!r}", path=str(path))
        c = np.zeros(n_y)
        if k[0] == "c":
            return c, float(k[1])
        if k[0] == "X":
            raise UserInputError(
                f"unsupported comparison {_show(whole)!r}: output conditions may use only Y_j "
                "(an input variable appears)",
                path=str(path),
            )
        if k[1] >= n_y:
            raise UserInputError(f"output condition uses undeclared output Y_{k[1]}", path=str(path))
        c[k[1]] = 1.0
        return c, 0.0
    if not expr or expr[0] not in ("+", "-", "*"):
        raise UserInputError(
            f"unsupported expression {_show(whole)!r}: terms may be Y_j, numbers, +, - and * by a number",
            path=str(path),
        )
    op, args = expr[0], [_linear(a, path, n_y, whole) for a in expr[1:]]
    if not args:
        raise UserInputError(f"syntax error in {_show(whole)!r}", path=str(path))
    if op == "+":
        return sum(a[0] for a in args), float(sum(a[1] for a in args))
    if op == "-":
        if len(args) == 1:
            return -args[0][0], -args[0][1]
        return args[0][0] - sum(a[0] for a in args[1:]), args[0][1] - float(sum(a[1] for a in args[1:]))
    coef, const = np.zeros(n_y), 1.0
    varying = [a for a in args if np.any(a[0])]
    if len(varying) > 1:
        raise UserInputError(f"unsupported expression {_show(whole)!r}: a product of outputs is not linear",
                             path=str(path))
    for a in args:
        if not np.any(a[0]):
            const *= a[1]
    if varying:
        return varying[0][0] * const, varying[0][1] * const
    return coef, const


def recover_clean_input(lb: np.ndarray, ub: np.ndarray, shape: tuple[int, ...]):
    """Clean input from a clipped l-inf box: returns (x float64 flat, eps, per-group radii)."""
    scale = max(1.0, float(np.abs(lb).max()), float(np.abs(ub).max()))
    half = (ub - lb) / 2.0
    eps_all = float(half.max())
    # bounds are usually float32 values: allow their rounding, but never a sizeable part of the radius
    tol = min(4e-6 * scale + 1e-4 * eps_all, 0.05 * eps_all)
    groups = shape[0] if (len(shape) == 3 and shape[0] > 1 and lb.size % shape[0] == 0) else 1
    x = np.empty_like(lb)
    radii = []
    for g_lb, g_ub, g_half, g_x in zip(
        lb.reshape(groups, -1), ub.reshape(groups, -1), half.reshape(groups, -1), x.reshape(groups, -1)
    ):
        eps = float(g_half.max())
        lo = float(g_lb.min())
        if eps < eps_all - tol:
            # Either this channel has its own smaller radius, or every one of its dimensions was
            # clipped (e.g. a constant channel at the range edge). In the latter case the widest
            # dimensions all touch the channel's range edge: keep the overall radius then.
            full = g_half >= eps - tol
            if (g_lb[full] <= lo + tol).all() or (g_ub[full] >= float(g_ub.max()) - tol).all():
                eps = eps_all
        radii.append(eps)
        full = np.abs(g_half - eps) <= tol
        at_min = g_lb <= lo + tol
        g_x[:] = np.where(full, (g_lb + g_ub) / 2.0, np.where(at_min, g_ub - eps, g_lb + eps))
    np.clip(x, lb, ub, out=x)
    return x, eps_all, radii


def load_vnnlib(source: Path, files: list[Path], shape, layout, n_classes, limit) -> Dataset:
    if limit is not None:
        files = files[:limit]
    count = math.prod(shape)
    notes: list[str] = []
    if layout != "nchw":
        notes.append("layout ignored for VNN-LIB: X_i always follows the model's own input layout")
    xs, lbs, ubs, eps_list, labels, targets, names, props = [], [], [], [], [], [], [], []
    per_channel: dict[tuple, int] = {}
    for f in files:
        spec = parse_vnnlib(f, read_text(f))
        if spec.n_x != count:
            raise UserInputError(
                f"the spec declares {spec.n_x} inputs but the model input has shape {fmt_shape(shape)} "
                f"({count} values)",
                path=str(f),
            )
        if n_classes is not None and spec.n_y != n_classes:
            raise UserInputError(
                f"the spec declares {spec.n_y} outputs but the model has {n_classes} classes", path=str(f)
            )
        x, eps, radii = recover_clean_input(spec.lb, spec.ub, shape)
        if len(radii) > 1 and max(radii) - min(radii) > 1e-3 * max(radii):
            key = tuple(float(f"{r:.6g}") for r in radii)
            per_channel[key] = per_channel.get(key, 0) + 1
        xs.append(x)
        lbs.append(spec.lb)
        ubs.append(spec.ub)
        eps_list.append(eps)
        labels.append(-1 if spec.label is None else spec.label)
        targets.append(spec.targets)
        props.append(spec.prop)
        names.append(f.name if f == source else f.relative_to(source).as_posix())
    for key, k in per_channel.items():
        notes.append(
            f"{k} spec(s) use per-channel l-inf radii {list(key)} (model input units); eps is the "
            "largest, lower/upper hold the exact box"
        )
    if not xs:  # pragma: no cover - callers pass at least one file
        raise UserInputError("the data set is empty (0 examples)", path=str(source))
    y = np.asarray(labels, dtype=np.int64)
    if n_classes is not None:
        labelled = y >= 0
        check_labels(y[labelled], [nm for nm, k in zip(names, labelled) if k], n_classes, source)
    unlabelled = int((y < 0).sum())
    if unlabelled:
        notes.append(
            f"{unlabelled} spec(s) state a general output property (no single label): certify and attack "
            "report whether the property holds, not a robustness radius"
        )
    n = len(xs)
    return Dataset(
        x=torch.from_numpy(np.stack(xs).astype(np.float32).reshape((n, *shape))),
        y=torch.from_numpy(y),
        eps=torch.tensor(eps_list, dtype=torch.float64),
        targets=targets,
        names=names,
        notes=notes,
        source=str(source),
        lower=torch.from_numpy(np.stack(lbs).reshape((n, *shape))),
        upper=torch.from_numpy(np.stack(ubs).reshape((n, *shape))),
        properties=props,
    )
