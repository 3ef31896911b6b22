"""Exceptions that separate the user's mistakes from lipverify's own.

``UserInputError`` (and its subclasses) means something the user can fix: a bad file, a wrong shape,
an operator lipverify cannot bound.  The CLI turns it into exit code 2 and a single line on stderr.
Anything else is an internal error (exit code 1).
"""

from __future__ import annotations


class LipverifyError(Exception):
    """Base class of every error lipverify raises on purpose."""


class UserInputError(LipverifyError):
    """A problem with the user's input: exit code 2, one line naming the file and the problem."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class UnsupportedOpError(UserInputError):
    """The model contains operators that have no sound Lipschitz bound in lipverify.

    ``nodes`` lists every offending ``(op_type, node_name)`` pair, not only the first one.
    """

    #: nodes named in the message; the rest are counted (``nodes`` keeps every one)
    SHOWN = 4

    def __init__(self, nodes: list[tuple[str, str]], path: str | None = None):
        self.nodes = list(nodes)
        counts: dict[str, int] = {}
        for op, _ in self.nodes:
            counts[op] = counts.get(op, 0) + 1
        listing = ", ".join(f"{op} (node {name})" for op, name in self.nodes[:self.SHOWN])
        more = len(self.nodes) - self.SHOWN
        if more > 0:
            kinds = ", ".join(f"{op} x{k}" for op, k in sorted(counts.items(), key=lambda kv: -kv[1])[:6])
            listing += f" and {more} more ({kinds}{', ...' if len(counts) > 6 else ''})"
        super().__init__(
            f"cannot bound {len(self.nodes)} operator(s) soundly: {listing}", path=path
        )


class FidelityError(UserInputError):
    """The converted model does not compute the same function as the file (above tolerance)."""


class SoundnessViolation(LipverifyError):
    """A certified point was broken by an attack: a bug in lipverify, reported loudly (exit code 3)."""
