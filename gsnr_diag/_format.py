"""One way to print a number, and one text table: terminal summaries, pytest messages, HTML and ``check``.

``number(12345.678)`` is ``12,346`` everywhere; ``digits`` sets the significant digits (4 in the terminal
and pytest messages, 3 in the report), ``missing`` what stands for a value that is not a finite number.
"""

from __future__ import annotations

from typing import Any

from ._io import clean_float

__all__ = ["number", "percent", "integer", "text_table"]


def number(x: Any, digits: int = 4, missing: str = "-") -> str:
    """``digits`` significant digits; scientific below 1e-3 and from 1e5; thousands separators in between."""
    v = clean_float(x)
    if v is None:
        return missing
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def percent(x: Any, missing: str = "-") -> str:
    """A fraction as a percentage with one decimal: ``0.5673`` → ``56.7%``."""
    v = clean_float(x)
    return missing if v is None else f"{100 * v:.1f}%"


def integer(x: Any, missing: str = "-") -> str:
    """A count with thousands separators."""
    v = clean_float(x)
    return missing if v is None else f"{int(v):,}"


def text_table(head: list[str], rows: list[list[str]], indent: str = "  ", left: tuple[int, ...] = (0,)) -> list[str]:
    """Lines of a fixed-width table: a header, a rule, the rows; columns in ``left`` left-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return (
            indent
            + "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        )

    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
