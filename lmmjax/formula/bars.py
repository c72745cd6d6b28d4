"""Split an lme4 formula into its fixed part and its random-effect bar terms.

Only the ``(lhs | group)`` syntax is handled here; the fixed part and each
bar's lhs are passed on to formulaic, which both mishandle bars.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmmjax.errors import LmmInputError

_NAME = r"[A-Za-z_.][A-Za-z0-9_.]*|`[^`]+`"
_GROUP_RE = re.compile(rf"^\s*({_NAME})(\s*[:/]\s*({_NAME}))*\s*$")


@dataclass(frozen=True)
class BarTerm:
    """One random-effect term as written, after ``||`` and ``/`` expansion.

    Attributes
    ----------
    lhs : str
        The model formula of the term's effects, e.g. ``"1 + Days"``.
    factors : tuple of str
        Grouping columns whose interaction defines the levels, in the order
        lme4 prints them (``("cask", "batch")`` for the nested part of
        ``batch/cask``).
    uncorrelated : bool
        True when the term came from ``||``: the bar lhs is split into one
        scalar term per column.
    source : str
        The bar term as written in the formula, for error messages.
    """

    lhs: str
    factors: tuple[str, ...]
    uncorrelated: bool
    source: str

    @property
    def group(self) -> str:
        """The grouping factor's name as lme4 prints it (``"a:b"``)."""
        return ":".join(self.factors)


@dataclass(frozen=True)
class ParsedFormula:
    """A formula split into response, fixed part and bar terms."""

    response: str
    fixed: str
    bars: tuple[BarTerm, ...]
    text: str


def formula_error(text: str, pos: int, message: str) -> LmmInputError:
    """Build an error that shows the formula with a caret under ``pos``."""
    return LmmInputError(
        f"formula syntax error at position {pos + 1}: {message}\n  {text}\n  {' ' * pos}^"
    )


def _check_parens(text: str) -> None:
    depth = 0
    opened: list[int] = []
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
            opened.append(i)
        elif ch == ")":
            if depth == 0:
                raise formula_error(text, i, "unmatched ')'")
            depth -= 1
            opened.pop()
    if opened:
        raise formula_error(text, opened[-1], "unclosed '('")


def _split_top(text: str, offset: int, seps: str) -> list[tuple[str, str, int]]:
    """Split ``text`` at top-level characters in ``seps``.

    Returns ``(operator, chunk, start)`` triples, the first with operator ``""``.
    """
    out = []
    depth, start, op = 0, 0, ""
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and ch in seps:
            out.append((op, text[start:i], offset + start))
            op, start = ch, i + 1
    out.append((op, text[start:], offset + start))
    return out


def _find_bar(inner: str) -> tuple[int, int] | None:
    """Position and width of the top-level ``|`` or ``||`` inside a parenthesis."""
    depth = 0
    for i, ch in enumerate(inner):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            return i, 2 if inner[i + 1 : i + 2] == "|" else 1
    return None


def _strip_backticks(name: str) -> str:
    name = name.strip()
    return name[1:-1] if name.startswith("`") and name.endswith("`") else name


def _expand_group(text: str, group: str, pos: int) -> list[tuple[str, ...]]:
    """Expand ``a/b/c`` to ``[(a,), (b, a), (c, b, a)]``; ``a:b`` stays one factor set."""
    if not _GROUP_RE.match(group):
        raise formula_error(
            text,
            pos,
            f"grouping factor {group.strip()!r} must be a column name, an "
            "interaction a:b or a nesting a/b",
        )
    nests = [part.strip() for part in group.split("/")]
    out: list[tuple[str, ...]] = []
    outer: tuple[str, ...] = ()
    for nest in nests:
        factors = tuple(_strip_backticks(f) for f in nest.split(":"))
        # lme4 writes the inner factor first: batch/cask -> cask:batch
        outer = factors + outer
        out.append(outer)
    return out


def _parse_bar(text: str, chunk: str, start: int) -> list[BarTerm]:
    stripped = chunk.strip()
    lead = start + len(chunk) - len(chunk.lstrip())
    inner = stripped[1:-1]
    bar = _find_bar(inner)
    assert bar is not None
    at, width = bar
    lhs, group = inner[:at].strip(), inner[at + width :]
    bar_pos = lead + 1 + at
    if not lhs:
        raise formula_error(text, bar_pos, f"random-effect term {stripped!r} has no left-hand side")
    if not group.strip():
        raise formula_error(
            text, bar_pos, f"random-effect term {stripped!r} has no grouping factor"
        )
    if "|" in group:
        second = bar_pos + width + group.index("|")
        raise formula_error(text, second, "more than one '|' in a random-effect term")
    groups = _expand_group(text, group, bar_pos + width + len(group) - len(group.lstrip()))
    return [BarTerm(lhs, g, width == 2, stripped) for g in groups]


def _is_bar_chunk(chunk: str) -> bool:
    s = chunk.strip()
    if not (s.startswith("(") and s.endswith(")")):
        return False
    # the outer parentheses must enclose the whole chunk
    depth = 0
    for i, ch in enumerate(s):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(s) - 1:
            return False
    return _find_bar(s[1:-1]) is not None


def parse_formula(text: str) -> ParsedFormula:
    """Split an lme4 formula into response, fixed-effect formula and bar terms.

    Parameters
    ----------
    text : str
        A formula such as ``"Reaction ~ Days + (Days | Subject)"``.

    Returns
    -------
    ParsedFormula

    Raises
    ------
    LmmInputError
        For syntax errors, with the position marked.
    """
    if not isinstance(text, str) or not text.strip():
        raise LmmInputError("formula must be a non-empty string such as 'y ~ x + (1 | g)'")
    _check_parens(text)
    tilde = _split_top(text, 0, "~")
    if len(tilde) != 2:
        pos = tilde[2][2] - 1 if len(tilde) > 2 else len(text) - 1
        raise formula_error(text, max(pos, 0), "a formula needs exactly one '~' (response ~ terms)")
    response = tilde[0][1].strip()
    if not response:
        raise formula_error(text, 0, "missing response before '~'")
    rhs, rhs_start = tilde[1][1], tilde[1][2]
    if not rhs.strip():
        raise formula_error(text, len(text) - 1, "missing terms after '~'")
    fixed_parts: list[str] = []
    bars: list[BarTerm] = []
    for op, chunk, start in _split_top(rhs, rhs_start, "+-"):
        if op and not chunk.strip() and start + len(chunk) == len(text):
            raise formula_error(text, start - 1, f"missing term after '{op}'")
        if _is_bar_chunk(chunk):
            if op == "-":
                raise formula_error(text, start - 1, "a random-effect term cannot be subtracted")
            bars.extend(_parse_bar(text, chunk, start))
            continue
        if "|" in chunk:
            pos = start + chunk.index("|")
            raise formula_error(text, pos, "'|' must appear inside parentheses, as in (1 | group)")
        fixed_parts.append(f"{op} {chunk.strip()}" if op else chunk.strip())
    fixed = " ".join(p for p in fixed_parts if p.strip("+ ")).strip()
    fixed = fixed.lstrip("+ ").strip()
    if not fixed:
        fixed = "1"
    if fixed.startswith("-"):
        fixed = "1 " + fixed
    return ParsedFormula(response=response, fixed=fixed, bars=tuple(bars), text=text)
