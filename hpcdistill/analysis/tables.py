"""Plain-text and markdown tables for the terminal and report.md."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A fixed-width table: header, rule, rows (all cells as given, left-aligned)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def mean_stderr(text_mean: float, text_err: float, digits: int = 4) -> str:
    return f"{text_mean:.{digits}f} ± {text_err:.{digits}f}"
