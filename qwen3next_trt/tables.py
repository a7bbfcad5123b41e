"""Plain-text tables for the CLI's reports (export summary, validation, FP8 quality)."""

from __future__ import annotations


def text_table(head: tuple[str, ...], rows: list[tuple[str, ...]], left: int) -> list[str]:
    """Header, a rule, then the rows; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(head), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)]
