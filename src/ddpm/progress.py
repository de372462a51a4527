"""Progress output: a rich progress bar on a terminal, plain fixed-field lines otherwise (logs, CI); every
line also goes, with its time, to a log file once one is given."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressReporter:
    """Shows step/total, loss, img/s and the time left; ``say`` prints a line above the bar. After
    ``record_to(path)``, each line (progress lines too, which the bar shows in place) is also appended to
    ``path``, starting with the lines said before: a run's header comes before its directory is ready."""

    def __init__(
        self, total: int, start: int = 0, console: Console | None = None, quiet: bool = False
    ) -> None:
        # quiet (the ranks other than the main one): nothing at all
        self.console = console or Console(file=sys.stdout, highlight=False, quiet=quiet)
        self.total, self.quiet = total, quiet
        self.log_file: Path | None = None
        self.log_failed = False
        self._unrecorded: list[str] = []  # lines said before there was a log file, with their times
        self.bar: Progress | None = None
        if self.console.is_terminal and not quiet:
            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[img_per_s]} img/s{task.fields[memory]}"),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task(
                "train", total=total, completed=start, loss="-", img_per_s="-", memory=""
            )

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

    def log(
        self, step: int, loss: float, img_per_s: float, eta_s: float, peak_gb: float | None = None
    ) -> None:
        memory = f" | peak {peak_gb:.2f} GB" if peak_gb is not None else ""
        line = (
            f"step {step}/{self.total} | loss {loss:.4f} | {img_per_s:,.0f} img/s{memory} | "
            f"eta {format_duration(eta_s)}"
        )
        self.record(line)
        if self.bar is not None:
            self.bar.update(
                self.task, completed=step, loss=f"{loss:.4f}", img_per_s=f"{img_per_s:,.0f}", memory=memory
            )
        else:
            self.console.print(line, soft_wrap=True)
            self.console.file.flush()  # a log file or pipe sees each line as it happens

    def say(self, message: str) -> None:
        self.record(message)
        self.console.print(message, soft_wrap=True)
        self.console.file.flush()

    def record_to(self, path: Path) -> None:
        """Append every line from now on to ``path``, the lines said so far first."""
        if self.quiet:
            return
        self.log_file = path
        unrecorded, self._unrecorded = self._unrecorded, []
        self._append(unrecorded)

    def record(self, line: str) -> None:
        """``line`` into the log file only, with its time (e.g. a message the caller prints to stderr)."""
        if self.quiet or self.log_failed:
            return
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        if self.log_file is None:
            self._unrecorded.append(stamped)
        else:
            self._append([stamped])

    def _append(self, lines: list[str]) -> None:
        # opened for each line: nothing to close, and a line is on disk when the run is killed after it
        try:
            with open(self.log_file, "a") as f:
                f.write("".join(line + "\n" for line in lines))
        except OSError as e:  # a log line is not worth the run: the console still has it
            self.log_failed = True
            self.console.print(
                f"warning: {self.log_file}: {e.strerror or e}; lines go to the console only", soft_wrap=True
            )
