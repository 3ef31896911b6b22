"""Disjunctive normal forms of VNN-LIB output conditions, combined without quadratic copying.

A DNF is a list of disjuncts, each a list of constraint ids (a conjunction). Every list handed to
these functions becomes owned by the result (it may be extended in place), so no list is copied
more than a bounded number of times:

* :func:`disjoin` concatenates the disjuncts of its parts onto the first;
* :class:`Conj` (and :func:`conjoin_all`) builds a conjunction part by part: single-disjunct parts
  are merged into one common list, the smaller into the larger; parts with several disjuncts are
  multiplied out (each product at least doubles the disjuncts, so at most ``log2(MAX_DISJUNCTS)``
  products happen); the common list is distributed over the product once, at the end.

``fail(message)`` raises the caller's error (a :class:`~lipverify.errors.UserInputError` naming the
file).

Warnings
--------
Fails when a result would hold more than ``MAX_DISJUNCTS`` disjuncts, or more than ``MAX_LITERALS``
constraint occurrences over all its disjuncts; both are checked before the result is built.
"""

from __future__ import annotations

from typing import Callable

#: most disjuncts of an output condition after distributing conjunctions over disjunctions
MAX_DISJUNCTS = 10_000
#: most constraint occurrences summed over all disjuncts
MAX_LITERALS = 10_000_000


def _literals(dnf: DNF) -> int:
    return sum(len(d) for d in dnf)


Fail = Callable[[str], None]
DNF = list[list[int]]


def _too_many_disjuncts(fail: Fail):
    fail(f"the output condition has more than {MAX_DISJUNCTS} disjuncts (after distributing conjunctions "
         "over disjunctions)")


def _too_many_literals(fail: Fail):
    fail(f"the output condition has more than {MAX_LITERALS} constraints over all its disjuncts (after "
         "distributing conjunctions over disjunctions)")


def disjoin(parts: list[DNF], fail: Fail) -> DNF:
    """The DNF of ``OR parts`` (the parts' disjuncts in order)."""
    if len(parts) == 1:
        return parts[0]
    out = parts[0]
    for p in parts[1:]:
        if len(out) + len(p) > MAX_DISJUNCTS:
            _too_many_disjuncts(fail)
        out.extend(p)
    return out


def conjoin_all(parts: list[DNF], fail: Fail) -> DNF:
    """The DNF of ``AND parts``."""
    if len(parts) == 1:
        return parts[0]
    c = Conj(fail)
    for p in parts:
        c.add(p)
    return c.result()


class Conj:
    """A conjunction of DNFs built part by part: single-disjunct parts are merged into one common
    list (the smaller list into the larger), the others multiplied out; :meth:`result` distributes
    the common part over the product. Every list handed to :meth:`add` becomes owned by it."""

    __slots__ = ("fail", "common", "multi", "multi_literals")

    def __init__(self, fail: Fail):
        self.fail = fail
        self.common: list[int] = []
        self.multi: list[list[int]] | None = None
        self.multi_literals = 0

    def add(self, dnf: DNF) -> None:
        if len(dnf) == 1:
            d = dnf[0]
            if len(d) > len(self.common):
                d.extend(self.common)
                self.common = d
            else:
                self.common.extend(d)
            if len(self.common) > MAX_LITERALS:
                _too_many_literals(self.fail)
            return
        if self.multi is None:
            self.multi, self.multi_literals = dnf, _literals(dnf)
            return
        if len(self.multi) * len(dnf) > MAX_DISJUNCTS:
            _too_many_disjuncts(self.fail)
        lit = _literals(dnf)
        total = self.multi_literals * len(dnf) + lit * len(self.multi)
        if total > MAX_LITERALS:
            _too_many_literals(self.fail)
        self.multi = [a + b for a in self.multi for b in dnf]
        self.multi_literals = total

    def add_one(self, rid: int) -> None:
        """``add([[rid]])`` without building the lists."""
        self.common.append(rid)
        if len(self.common) > MAX_LITERALS:
            _too_many_literals(self.fail)

    def result(self) -> DNF:
        if self.multi is None:
            return [self.common]
        if self.common:
            if self.multi_literals + len(self.multi) * len(self.common) > MAX_LITERALS:
                _too_many_literals(self.fail)
            for d in self.multi:
                d.extend(self.common)
        return self.multi


__all__ = ["MAX_DISJUNCTS", "MAX_LITERALS", "Conj", "conjoin_all", "disjoin"]

