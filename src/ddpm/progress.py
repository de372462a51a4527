"""Progress output: a rich progress bar on a terminal, plain fixed-field lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressReporter:
    """Shows step/total, loss, img/s and the time left; ``say`` prints a line above the bar."""

    def __init__(
        self, total: int, start: int = 0, console: Console | None = None, quiet: bool = False
    ) -> None:
        # quiet (the ranks other than the main one): nothing at all
        self.console = console or Console(file=sys.stdout, highlight=False, quiet=quiet)
        self.total = total
        self.bar: Progress | None = None
        if self.console.is_terminal and not quiet:
            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[img_per_s]} img/s"),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", img_per_s="-")

    def __enter__(self) -> ProgressReporter:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def log(self, step: int, loss: float, img_per_s: float, eta_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", img_per_s=f"{img_per_s:,.0f}")
        else:
            self.console.print(
                f"step {step}/{self.total} | loss {loss:.4f} | {img_per_s:,.0f} img/s | "
                f"eta {format_duration(eta_s)}",
                soft_wrap=True,
            )
            self.console.file.flush()  # a log file or pipe sees each line as it happens

    def say(self, message: str) -> None:
        self.console.print(message, soft_wrap=True)
        self.console.file.flush()
