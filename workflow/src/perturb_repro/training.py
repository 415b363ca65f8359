"""Pieces every trainer shares: a stop flag for SLURM's signals and the step/loss log."""

from __future__ import annotations

import csv
import signal
from pathlib import Path
from types import FrameType


class Preempted(RuntimeError):
    """Training saved its state and stopped because the scheduler asked it to."""


class StopFlag:
    """Turns SIGTERM/SIGUSR1 (sent by SLURM before preemption or time-out) into a flag the loop polls,
    so the loop can finish its step, save, and exit non-zero instead of dying mid-write."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.raised: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.raised = signum

    def __enter__(self) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainLog:
    """Append-only CSV of (step, loss[, extra columns]) that survives restarts: a resumed run keeps earlier rows.
    ``extra`` names per-step counters a task reports beside the loss (e.g. PRiMeFlow's ``ot_fallbacks``)."""

    def __init__(self, path: Path, resume_from_step: int, extra: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        self.extra = tuple(extra)
        width = 2 + len(self.extra)
        rows: list[list[str]] = []
        if self.path.exists() and resume_from_step > 0:
            with open(self.path) as handle:
                rows = [r for r in csv.reader(handle)][1:]
            # a SIGKILL can cut the last row short (the buffer flushes when full): keep whole rows only
            rows = [r for r in rows if len(r) == width and r[0].isdigit() and all(r[1:]) and int(r[0]) < resume_from_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "w", newline="")
        self._writer = csv.writer(self._handle)
        self._writer.writerow(["step", "loss", *self.extra])
        self._writer.writerows(rows)

    def add(self, step: int, loss: float, extra: dict | None = None) -> None:
        values = [(extra or {})[k] for k in self.extra]
        self._writer.writerow([step, f"{loss:.6g}", *values])

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
