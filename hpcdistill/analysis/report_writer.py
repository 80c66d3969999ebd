"""One small writer for every report (analyze, replay, probe): markdown sections in order, PNG
figures beside them, and the same tables on the terminal when `echo` is on.

`echo` is the one switch between library code and the terminal: the studies' modules build
tables and figures; only this writer prints them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hpcdistill.analysis.tables import format_table, markdown_table


class Report:
    """Sections of one report; figures go to `out_dir/<name>` (the name is the file name).
    `path`: where `write()` puts the markdown (a SweepPaths report); None for a part of a report
    that another one composes (`sections`)."""

    def __init__(self, out_dir: str | Path, *, path: str | Path | None = None, echo: bool = False):
        self.out_dir = Path(out_dir)
        self.path = None if path is None else Path(path)
        self.echo = echo
        self.sections: list[str] = []

    def say(self, text: str) -> None:
        """A line for the terminal only (not in report.md)."""
        if self.echo:
            print(text)

    def section(self, markdown: str, terminal: str | None = None) -> None:
        """A markdown block; `terminal`: what to print for it, if anything."""
        self.sections.append(markdown)
        if terminal is not None:
            self.say(terminal)

    def table(self, title: str, headers: list[str], rows: list[list[str]], *, level: int = 2) -> None:
        self.section(f"{'#' * level} {title}\n\n{markdown_table(headers, rows)}\n",
                     f"\n{title}\n{format_table(headers, rows)}")

    def figure(self, name: str, draw: Callable[[Path], object], alt: str | None = None) -> Path:
        """`draw(path)` saves the figure to `out_dir/name`; the report links it."""
        path = self.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(path)
        self.section(f"![{alt or path.stem}]({name})\n", f"figure: {path}")
        return path

    def skipped(self, title: str, skipped: list, *, level: int = 2) -> None:
        """The shards a study could not read, listed (never averaged in)."""
        if skipped:
            lines = "\n".join(f"- `{path}`: {reason}" for path, reason in skipped)
            self.section(f"{'#' * level} {title}\n\n{lines}\n")

    def text(self) -> str:
        return "\n".join(self.sections)

    def write(self) -> Path:
        if self.path is None:
            raise ValueError("this report has no path; pass Report(..., path=...) to write it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text(), encoding="utf-8")
        self.say(f"report: {self.path}")
        return self.path


__all__ = ["Report"]
