"""Reading VNN-LIB text into declarations, input bounds and an output condition, without recursion.

:func:`scan` reads the whole text in one pass and returns a :class:`Scan`. Nothing in it recurses
and nothing is copied more than a bounded number of times, so parse time and memory grow linearly
with the file, whatever its nesting depth (``(+ (+ (+ ...)))`` 10^5 levels deep parses in well under
a second) or its number of asserts:

* the common top-level forms (``(declare-const X_i Real)``, ``(assert (<= X_i v))`` with the number
  on either side, ``(assert (>= Y_i Y_j))`` and comparisons of an output with a number) are matched
  by one regular expression each, without building a parse tree;
* any other top-level form is tokenised into nested lists with an explicit stack;
* output conditions (``or``, ``and``, comparisons) are evaluated bottom-up with an explicit stack into
  a disjunctive normal form whose conjunctions hold constraint ids, combined by
  :mod:`lipverify.data.vnnlib_dnf` (never copying a growing list once per assert);
* linear terms (``Y_j``, numbers, ``+``, ``-``, ``*`` by a number) are evaluated in two passes over an
  explicit stack: constant sub-terms bottom-up, then each ``Y_j``'s coefficient top-down as the
  product of the multipliers on its path. Coefficients are kept sparse (a dict per constraint), so
  nothing is sized by an output index before the declared outputs are checked against the model.

No regular expression used here can backtrack more than linearly (numbers are matched by an
unambiguous pattern), and variable indices longer than 12 digits are refused rather than converted.

Warnings
--------
A :class:`~lipverify.errors.UserInputError` naming the file is raised for: unbalanced parentheses,
stray text, unknown forms or functions, an empty ``(or)``/``(and)``, comparisons that use an input
variable in an output condition or do not depend on any output, products of outputs, non-finite
coefficients or constants, variable indices that are too large, declarations the caller's
``declare`` refuses, input bounds inside an output disjunction, more than 10,000 disjuncts after
distributing conjunctions over disjunctions or more than 10^7 constraints over all disjuncts
(:mod:`lipverify.data.vnnlib_dnf`), and a parse tree or a set of distinct constraints whose estimated
size exceeds the memory limit (:func:`lipverify.limits.check_alloc`).
"""

from __future__ import annotations

import math
import re
from array import array
from pathlib import Path

from lipverify.data.vnnlib_dnf import Conj, conjoin_all, disjoin
from lipverify.errors import UserInputError
from lipverify.limits import check_alloc

#: a number; unambiguous (each digit can be matched one way only), so a failed match is linear
NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
#: longest variable index (digits)
MAX_INDEX_DIGITS = 12

COMMENT_RE = re.compile(r";[^\n]*")
NEG_RE = re.compile(rf"\(\s*-\s+({NUM})\s*\)")
_NUM_RE = re.compile(NUM)
_VAR_RE = re.compile(r"([XY])_(\d+)")
_TOKEN_RE = re.compile(r"\(|\)|[^\s()]+")
_WS_RE = re.compile(r"\s*")
_FAST_RE = re.compile(
    rf"""\s*(?:
        \(\s*declare-const\s+(?P<dk>[XY])_(?P<di>\d+)\s+Real\s*\)
      | \(\s*assert\s+\(\s*(?P<bo><=|>=)\s+X_(?P<bi>\d+)\s+(?P<bv>{NUM})\s*\)\s*\)
      | \(\s*assert\s+\(\s*(?P<co><=|>=)\s+(?P<cv>{NUM})\s+X_(?P<ci>\d+)\s*\)\s*\)
      | \(\s*assert\s+\(\s*(?P<oo><=|>=|<|>)\s+(?P<oa>Y_\d+|{NUM})\s+(?P<ob>Y_\d+|{NUM})\s*\)\s*\)
    )""",
    re.X,
)
CMP = frozenset({"<=", ">=", "<", ">"})
IGNORED_FORMS = frozenset({"check-sat", "exit", "set-logic", "set-info", "set-option"})
_TERM_HEADS = ("+", "-", "*")
_NODE_BYTES = 120  # estimated bytes per parse-tree node or atom reference
_ROW_BYTES = 300  # estimated bytes per distinct constraint (its key, index entry and matrix row)
_ATOM_CACHE = 1 << 16  # most atoms whose meaning is remembered
_MISSING = object()


class Scan:
    """What :func:`scan` found: declared indices, input bounds (parallel arrays: index, value, whether
    it is an upper bound), the output condition as a DNF of constraint ids (``None``: no output
    assert), the constraints (``rows[id] = (d, j1, c1, j2, c2, ...)`` with increasing ``j``, meaning
    ``sum c*Y_j >= d``) and the largest output index any constraint uses (-1: none)."""

    __slots__ = ("xs", "ys", "bound_idx", "bound_val", "bound_upper", "dnf", "rows", "max_y")


def show(expr, limit: int = 80) -> str:
    """``expr`` as VNN-LIB text, cut to ``limit`` characters (iterative: any depth)."""
    if not isinstance(expr, list):
        text = str(expr[: limit + 1])
        return text if len(text) <= limit else text[: limit - 3] + "..."
    out = ["("]
    size = 1
    stack = [(expr, 0)]
    while stack and size <= limit:
        node, i = stack.pop()
        if i < len(node):
            stack.append((node, i + 1))
            if i:
                out.append(" ")
            child = node[i]
            if isinstance(child, list):
                out.append("(")
                stack.append((child, 0))
            else:
                out.append(child[: limit + 1])
        else:
            out.append(")")
        size += len(out[-1])
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scan(text: str, path: Path, declare=None) -> Scan:
    """Parse VNN-LIB ``text`` (see the module docstring); ``path`` names the file in errors.
    ``declare(kind, index)``, when given, is called on every declaration and may refuse it (the
    caller compares indices with the model's sizes before the declared sets can grow)."""
    return _Parser(path, declare).run(text)


class _Parser:
    def __init__(self, path: Path, declare=None):
        self.path = str(path)
        self.declare = declare
        self.next_rows_check = 1 << 20
        self.xs: set[int] = set()
        self.ys: set[int] = set()
        self.bound_idx = array("q")
        self.bound_val = array("d")
        self.bound_upper = bytearray()
        self.rows: list[tuple[tuple, float]] = []
        self.row_ids: dict[tuple, int] = {}
        self.max_y = -1
        self.top = Conj(self.fail)
        self.any_output = False
        self.atoms: dict[str, tuple | None] = {}

    def fail(self, message: str):
        raise UserInputError(message, path=self.path)

    # ---------------------------------------------------------------------------------------------
    # top level

    def run(self, text: str) -> Scan:
        text = COMMENT_RE.sub(" ", text)
        text = NEG_RE.sub(_negate_literal, text)
        pos, end = 0, len(text)
        fast = _FAST_RE.match
        while True:
            m = fast(text, pos)
            if m is not None:
                pos = m.end()
                self._fast(m)
                continue
            pos = _WS_RE.match(text, pos).end()
            if pos >= end:
                break
            form, pos = self._read_form(text, pos)
            self._form(form)
        s = Scan()
        s.xs, s.ys, s.bound_idx, s.bound_val, s.bound_upper = (self.xs, self.ys, self.bound_idx, self.bound_val,
                                                              self.bound_upper)
        s.dnf = self.top.result() if self.any_output else None
        s.rows, s.max_y = self.rows, self.max_y
        return s

    def _fast(self, m: re.Match) -> None:
        g = m.lastgroup
        if g == "di":
            self._declare(m.group("dk"), m.group("di"))
        elif g == "bv":
            self._bound(self.index("X", m.group("bi")), float(m.group("bv")), m.group("bo") == "<=")
        elif g == "ci":
            self._bound(self.index("X", m.group("ci")), float(m.group("cv")), m.group("co") == ">=")
        else:
            self.simple(m.group("oo"), m.group("oa"), m.group("ob"))

    def _declare(self, kind: str, digits: str) -> None:
        i = self.index(kind, digits)
        if self.declare is not None:
            self.declare(kind, i)
        (self.xs if kind == "X" else self.ys).add(i)

    def _bound(self, i: int, v: float, upper: bool) -> None:
        self.bound_idx.append(i)
        self.bound_val.append(v)
        self.bound_upper.append(upper)

    def _read_form(self, text: str, pos: int):
        """The top-level form starting at ``pos`` as nested lists, and the position after it."""
        stack: list[list] = []
        atoms: dict[str, str] = {}
        nodes, next_check = 0, 1 << 20
        for m in _TOKEN_RE.finditer(text, pos):
            tok = m.group()
            if tok == "(":
                stack.append([])
                nodes += 1
                if nodes >= next_check:
                    check_alloc(nodes * _NODE_BYTES, "the parse tree of one VNN-LIB form", self.path)
                    next_check *= 2
            elif tok == ")":
                if not stack:
                    self.fail("syntax error: unbalanced ')'")
                done = stack.pop()
                if not stack:
                    return done, m.end()
                stack[-1].append(done)
            elif not stack:
                self.fail(f"syntax error: unexpected text {show(tok)!r}")
            else:
                stack[-1].append(atoms.setdefault(tok, tok))
        self.fail("syntax error: unbalanced '(' (file truncated?)")

    def _form(self, form: list) -> None:
        if not form:
            self.fail("syntax error: empty '()'")
        head = form[0]
        if head in IGNORED_FORMS:
            return
        if head == "declare-const":
            if len(form) == 3 and form[2] == "Real" and isinstance(form[1], str):
                m = _VAR_RE.fullmatch(form[1])
                if m:
                    self._declare(m.group(1), m.group(2))
                    return
            self.fail(f"unsupported declaration {show(form)!r}: only 'X_i Real' and 'Y_j Real' are understood")
        if head != "assert" or len(form) != 2:
            self.fail(f"syntax error: unexpected form {show(form)!r}")
        body = form[1]
        items = body[1:] if isinstance(body, list) and body and body[0] == "and" else [body]
        for item in items:
            bound = self.input_bound(item)
            if bound is not None:
                self._bound(*bound)
            else:
                self._output(item)

    def _output(self, expr) -> None:
        self.any_output = True
        self.top.add(self.dnf(expr))

    # ---------------------------------------------------------------------------------------------
    # atoms

    def index(self, kind: str, digits: str) -> int:
        if len(digits.lstrip("0")) > MAX_INDEX_DIGITS:
            self.fail(f"variable {kind}_{digits[:MAX_INDEX_DIGITS]}... has an index of {len(digits)} digits "
                      f"(at most {MAX_INDEX_DIGITS})")
        return int(digits)

    def atom(self, a):
        """('X'|'Y', index) for a variable, ('c', value) for a number, None otherwise (cached)."""
        if not isinstance(a, str):
            return None
        k = self.atoms.get(a, _MISSING)
        if k is not _MISSING:
            return k
        m = _VAR_RE.fullmatch(a)
        if m:
            k = m.group(1), self.index(m.group(1), m.group(2))
        elif _NUM_RE.fullmatch(a):
            k = "c", float(a)
        else:
            k = None
        if len(self.atoms) >= _ATOM_CACHE:
            self.atoms.clear()
        self.atoms[a] = k
        return k

    def input_bound(self, expr):
        """(i, value, is_upper) for ``(<= X_i v)`` / ``(>= v X_i)`` and the like; None otherwise."""
        if not (isinstance(expr, list) and len(expr) == 3 and expr[0] in CMP):
            return None
        op, a, b = expr
        ka, kb = self.atom(a), self.atom(b)
        if ka is None or kb is None:
            return None
        ge = op in (">=", ">")
        if ka[0] == "X" and kb[0] == "c":
            return ka[1], kb[1], not ge
        if ka[0] == "c" and kb[0] == "X":
            return kb[1], ka[1], ge
        return None

    # ---------------------------------------------------------------------------------------------
    # output conditions

    def dnf(self, expr) -> list[list[int]]:
        """Disjunctive normal form (lists of constraint ids) of an output condition."""
        done: dict[int, list] = {}
        stack = [(expr, False)]
        while stack:
            node, ready = stack.pop()
            if ready:
                parts = [done.pop(id(c)) for c in node[1:]]
                done[id(node)] = disjoin(parts, self.fail) if node[0] == "or" else conjoin_all(parts, self.fail)
                continue
            if not (isinstance(node, list) and node):
                self.fail(f"unsupported assertion {show(node)!r}")
            head = node[0]
            if head == "or" or head == "and":
                if len(node) == 1:
                    self.fail(f"unsupported output condition: empty ({head})")
                if head == "and":
                    for c in node[1:]:
                        if self.input_bound(c) is not None:
                            self.fail(f"unsupported condition {show(node)!r}: input bounds inside an output "
                                      "disjunction (several input regions in one file) are not supported; write "
                                      "one file per region")
                stack.append((node, True))
                stack.extend((c, False) for c in reversed(node[1:]))
            elif head in CMP:
                done[id(node)] = [[self.constraint(node)]]
            else:
                self.fail(f"unsupported assertion {show(node)!r}: expected input bounds, or output conditions "
                          "made of (or ...), (and ...) and linear comparisons of Y_j")
        return done.pop(id(expr))

    def constraint(self, expr) -> int:
        """The id of the constraint ``c . Y >= d`` that comparison ``expr`` states."""
        if len(expr) != 3:
            self.fail(f"syntax error in {show(expr)!r}")
        if self.input_bound(expr) is not None:
            self.fail(f"unsupported condition {show(expr)!r}: input bounds inside an output disjunction are "
                      "not supported")
        for a in _atoms(expr[1:]):
            if self.atom(a) is None:
                self.fail(f"syntax error in {show(expr)!r}")
        ca, ka = self.linear(expr[1], expr)
        cb, kb = self.linear(expr[2], expr)
        # a >= b  <=>  (a - b) >= 0 ; a <= b  <=>  (b - a) >= 0
        if expr[0] in ("<=", "<"):
            ca, ka, cb, kb = cb, kb, ca, ka
        coef = ca
        for j, v in cb.items():
            coef[j] = coef.get(j, 0.0) - v
        const = ka - kb
        items = sorted((j, v) for j, v in coef.items() if v != 0.0)
        if not items:
            self._constant_comparison(expr)
        if not (math.isfinite(const) and all(math.isfinite(v) for _, v in items)):
            self.fail(f"output condition {show(expr)!r} has a coefficient or constant that is not a finite number")
        flat = [-float(const) + 0.0]  # + 0.0: no -0.0
        for j, v in items:
            flat.append(j)
            flat.append(v)
        return self.row(tuple(flat))

    def row(self, key: tuple) -> int:
        """The id of constraint ``key = (d, j1, c1, j2, c2, ...)`` (``j`` increasing): ``sum c*Y_j >= d``."""
        rid = self.row_ids.get(key)
        if rid is None:
            rid = self.row_ids[key] = len(self.rows)
            self.rows.append(key)
            if rid >= self.next_rows_check:
                check_alloc(rid * _ROW_BYTES, f"the {rid} distinct constraints of the output condition", self.path)
                self.next_rows_check *= 2
            if key[-2] > self.max_y:
                self.max_y = key[-2]
        return rid

    def simple(self, op: str, a: str, b: str) -> None:
        """A top-level ``(assert (op a b))`` with ``a``, ``b`` each ``Y_j`` or a number: the common case,
        added without building a tree (same meaning as :meth:`constraint`)."""
        ka, kb = self.atom(a), self.atom(b)
        if op == "<=" or op == "<":
            ka, kb = kb, ka
        # ka >= kb
        if ka[0] == "c":
            if kb[0] == "c":
                self._constant_comparison([op, a, b])
            key = (-ka[1] + 0.0, kb[1], -1.0)  # c >= Y_j  <=>  -Y_j >= -c (+ 0.0: no -0.0)
        elif kb[0] == "c":
            key = (kb[1], ka[1], 1.0)
        elif ka[1] == kb[1]:
            self._constant_comparison([op, a, b])
        elif ka[1] < kb[1]:
            key = (0.0, ka[1], 1.0, kb[1], -1.0)
        else:
            key = (0.0, kb[1], -1.0, ka[1], 1.0)
        if not math.isfinite(key[0]):
            self.fail(f"output condition {show([op, a, b])!r} has a coefficient or constant that is not a finite "
                      "number")
        self.any_output = True
        self.top.add_one(self.row(key))

    def _constant_comparison(self, expr):
        self.fail(f"output condition {show(expr)!r} does not depend on any output (it compares Y_j with itself "
                  "or numbers with numbers)")

    def linear(self, term, whole) -> tuple[dict[int, float], float]:
        """``(coefficients {j: c}, constant)`` of a linear term over the outputs."""
        if not isinstance(term, list):
            k = self.atom(term)
            if k is None:
                self.fail(f"syntax error in {show(whole)!r}")
            if k[0] == "c":
                return {}, k[1]
            if k[0] == "X":
                self._input_in_output(whole)
            return {k[1]: 1.0}, 0.0
        if all(not isinstance(a, list) for a in term):  # a flat term such as (+ Y_1 0.5): one pass
            flat = self._flat(term, whole)
            if flat is not None:
                return flat
        # pass 1, bottom-up: the value of every constant sub-term (None: depends on an output)
        value: dict[int, float | None] = {}
        stack = [(term, False)]
        while stack:
            node, ready = stack.pop()
            if not ready:
                if not node or node[0] not in _TERM_HEADS:
                    self.fail(f"unsupported expression {show(whole)!r}: terms may be Y_j, numbers, +, - and * "
                              "by a number")
                if len(node) == 1:
                    self.fail(f"syntax error in {show(whole)!r}")
                stack.append((node, True))
                stack.extend((a, False) for a in node[1:] if isinstance(a, list))
                continue
            vals = []
            for a in node[1:]:
                if isinstance(a, list):
                    vals.append(value[id(a)])
                else:
                    k = self.atom(a)
                    if k[0] == "X":
                        self._input_in_output(whole)
                    vals.append(k[1] if k[0] == "c" else None)
            head = node[0]
            if any(v is None for v in vals):
                if head == "*" and sum(v is None for v in vals) > 1:
                    self.fail(f"unsupported expression {show(whole)!r}: a product of outputs is not linear")
                value[id(node)] = None
            elif head == "+":
                value[id(node)] = float(sum(vals))
            elif head == "-":
                value[id(node)] = -vals[0] if len(vals) == 1 else vals[0] - float(sum(vals[1:]))
            else:
                p = 1.0
                for v in vals:
                    p *= v
                value[id(node)] = p
        # pass 2, top-down: each output's coefficient is the product of the multipliers on its path
        coef: dict[int, float] = {}
        const = 0.0
        todo = [(term, 1.0)]
        while todo:
            node, mult = todo.pop()
            if not isinstance(node, list):
                k = self.atom(node)
                if k[0] == "c":
                    const += mult * k[1]
                else:
                    coef[k[1]] = coef.get(k[1], 0.0) + mult
                continue
            v = value[id(node)]
            if v is not None:
                const += mult * v
                continue
            head, args = node[0], node[1:]
            if head == "+":
                todo.extend((a, mult) for a in args)
            elif head == "-":
                if len(args) == 1:
                    todo.append((args[0], -mult))
                else:
                    todo.append((args[0], mult))
                    todo.extend((a, -mult) for a in args[1:])
            else:
                p, varying = 1.0, None
                for a in args:
                    av = value[id(a)] if isinstance(a, list) else self.atom(a)
                    if isinstance(a, list):
                        if av is None:
                            varying = a
                        else:
                            p *= av
                    elif av[0] == "c":
                        p *= av[1]
                    else:
                        varying = a
                todo.append((varying, mult * p))
        return coef, const

    def _flat(self, term: list, whole):
        """``linear`` of a term whose arguments are all atoms (None: leave it to the general case)."""
        head = term[0]
        if head not in _TERM_HEADS or len(term) == 1:
            return None
        ks = [self.atom(a) for a in term[1:]]
        if any(k[0] == "X" for k in ks):
            self._input_in_output(whole)
        if head == "*":
            return None
        coef: dict[int, float] = {}
        consts = []
        for pos, k in enumerate(ks):
            sign = -1.0 if head == "-" and (pos > 0 or len(ks) == 1) else 1.0
            if k[0] == "c":
                consts.append(k[1])
            else:
                coef[k[1]] = coef.get(k[1], 0.0) + sign
        if head == "+":
            return coef, float(sum(consts))
        if ks[0][0] != "c":  # (- Y_a c1 c2 ...) or (- Y_a Y_b ...): the constant is minus the sum
            return coef, -float(sum(consts))
        if len(ks) == 1:
            return coef, -consts[0]
        return coef, consts[0] - float(sum(consts[1:]))

    def _input_in_output(self, whole):
        self.fail(f"unsupported comparison {show(whole)!r}: output conditions may use only Y_j (an input "
                  "variable appears)")


def _atoms(expr):
    """The operand atoms of a term list (function symbols at the head of sub-lists skipped)."""
    stack = [iter(expr)]
    while stack:
        for e in stack[-1]:
            if isinstance(e, list):
                stack.append(iter(e[1:]))
                break
            yield e
        else:
            stack.pop()


def _negate_literal(m: re.Match) -> str:
    v = m.group(1)
    if v.startswith("-"):
        return v[1:]
    return "-" + (v[1:] if v.startswith("+") else v)
