"""How a run stops early: a signal asks for it, or a fault forces it; either way with a message that says
what was kept and how to go on."""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable
from enum import Enum
from types import FrameType, TracebackType
from typing import Any

import torch


class OnNonFinite(Enum):
    """What training does when a step's loss or gradient is NaN or infinite."""

    stop = "stop"
    skip = "skip"


class TrainingStopped(Exception):
    """The run stopped before its last step (a signal, a non-finite step, a file it could not write).
    ``error`` is False for a requested stop; ``exit_code`` is the command's exit status.
    ``pass_notice_on``, where set, passes the signal that asked for the stop on to the handler it had
    before ddpm's; the command calls it after its message (submitit's handler requeues the job, then
    exits)."""

    def __init__(
        self,
        message: str,
        exit_code: int = 1,
        error: bool = True,
        pass_notice_on: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(message)
        self.exit_code, self.error, self.pass_notice_on = exit_code, error, pass_notice_on

    def line(self, prog: str) -> str:
        """The one line the command ends with, on stderr and in the run's train.log."""
        return f"{prog}: {'error: ' if self.error else ''}{self}"


class StopRequests:
    """SIGINT, SIGTERM and SIGUSR2 ask the loop to stop at the next step boundary, after a checkpoint;
    ``signum`` is the first that came. A second SIGINT or SIGTERM restores the previous handlers and is
    delivered again, stopping at once (the last checkpoint on disk is whole either way: checkpoints are
    written atomically).

    SIGUSR2 is a scheduler's notice that the job's time is nearly up (Slurm's --signal, which submitit asks
    for): it never stops at once, and where a Python handler had it before ddpm's (submitit's, which
    requeues the job), ``pass_notice_on`` calls that handler once the checkpoint is written, so the job is
    requeued without losing the steps since the previous checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    NOTICES = (signal.SIGUSR2,)

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}
        self._notice_handlers: dict[int, Callable[[int, FrameType | None], Any]] = {}

    @property
    def signum(self) -> int | None:
        return self.received[0] if self.received else None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def notice(self) -> int | None:
        """The first notice that came and that a Python handler had before ddpm's (None: none such)."""
        return next((s for s in self.received if s in self._notice_handlers), None)

    @property
    def pass_notice_on(self) -> Callable[[], None] | None:
        """That notice's previous handler, bound to the signal, for the command to call after its
        message; None where no such notice came."""
        notice = self.notice
        return None if notice is None else functools.partial(self._notice_handlers[notice], notice, None)

    def __enter__(self) -> StopRequests:
        # Python only lets the main thread install handlers; elsewhere the signals keep their defaults.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            self._notice_handlers = {
                s: h for s, h in self._previous.items() if s in self.NOTICES and callable(h)
            }
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        insisting = signum not in self.NOTICES and any(s not in self.NOTICES for s in self.received)
        self.received.append(signum)
        if insisting:
            self._restore()
            signal.raise_signal(signum)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader workers leave SIGINT / SIGTERM / SIGUSR2 to the main process, which stops them when it
    is done: a Ctrl-C reaches the whole process group (and Slurm signals every process of the job), which
    would otherwise kill them mid-batch."""
    for s in StopRequests.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class NonFiniteWatch:
    """Watches for steps whose loss or gradient is NaN or infinite, in device tensors that only ``check``
    and ``skipped`` read back, at the loop's cadences, so no step waits for the device.

    Without ``skip`` the first bad step is kept and stops the run at the next check (the last checkpoint
    holds good weights). With ``skip`` such a step changed nothing (train_step's masked update); the watch
    counts them, and ``max_in_a_row`` of them in a row stop the run at the next check."""

    def __init__(self, skip: bool, max_in_a_row: int, device: torch.device) -> None:
        self.skip, self.max_in_a_row = skip, max_in_a_row
        # first bad step (0: none), skipped steps, bad steps in a row now, step the row reached the limit
        self.first_bad, self._skipped, self.in_a_row, self.tripped = torch.zeros(
            4, dtype=torch.long, device=device
        )

    def record(self, step: int, finite: torch.Tensor) -> None:
        bad = ~finite
        if not self.skip:
            self.first_bad = torch.where(bad & (self.first_bad == 0), step, self.first_bad)
            return
        self._skipped = self._skipped + bad
        self.in_a_row = torch.where(bad, self.in_a_row + 1, 0)
        limit = (self.in_a_row >= self.max_in_a_row) & (self.tripped == 0)
        self.tripped = torch.where(limit, step, self.tripped)

    @property
    def skipped(self) -> int:
        """Steps skipped so far (a host sync: read at the log cadence)."""
        return int(self._skipped)

    def check(
        self, then: Callable[[], str], agree: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    ) -> None:
        """Stop if a step was non-finite (or, with skip, too many in a row). ``agree`` (every rank calls
        it) makes every rank's answer one; ``then()`` ends the message (what was kept, how to go on) and
        is built only on a fault."""
        bad = int(agree(self.tripped if self.skip else self.first_bad))
        if bad and self.skip:
            raise TrainingStopped(
                f"{self.max_in_a_row} steps in a row up to step {bad} had a non-finite loss or gradient "
                f"(max_nonfinite={self.max_in_a_row}); {then()}"
            )
        if bad:
            raise TrainingStopped(f"non-finite loss or gradient at step {bad}; {then()}")
