"""R's ``.`` in the fixed part: every data column not named elsewhere in the formula."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from lmmjax.formula.bars import _split_top

__all__ = ["expand_dot", "has_dot"]

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _chunks(fixed: str) -> list[tuple[str, str, int]]:
    return _split_top(fixed, 0, "+-")


def has_dot(fixed: str) -> bool:
    """Whether the fixed-effect formula has ``.`` as one of its terms."""
    return any(chunk.strip() == "." for _, chunk, _ in _chunks(fixed))


def _quote(name: str) -> str:
    return name if _PLAIN.match(name) else f"`{name}`"


def expand_dot(fixed: str, columns: Sequence[str], named: Iterable[str]) -> str:
    """Replace each ``.`` term of a fixed-effect formula by the columns not named elsewhere.

    Parameters
    ----------
    fixed : str
        The fixed part, e.g. ``"1 + ."`` or ``". - x3"``.
    columns : sequence of str
        The data's columns, in order.
    named : iterable of str
        Columns named elsewhere in the formula (the response, the random-effect
        terms and their grouping factors, the other fixed terms).

    Returns
    -------
    str
        The formula with ``.`` written out (column names that are not plain
        identifiers in backticks); unchanged when it has no ``.``.
    """
    if not has_dot(fixed):
        return fixed
    skip = set(named)
    rest = [c for c in columns if c not in skip]
    expansion = " + ".join(_quote(c) for c in rest) if rest else "1"
    parts = []
    for op, chunk, _ in _chunks(fixed):
        text = f"({expansion})" if chunk.strip() == "." and op == "-" else chunk.strip()
        if chunk.strip() == "." and op != "-":
            text = expansion
        parts.append(f"{op} {text}" if op else text)
    return " ".join(parts)
