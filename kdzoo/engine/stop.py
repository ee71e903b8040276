"""Graceful stop on SIGTERM / SIGUSR1 / Ctrl-C: finish the current step, write a checkpoint, exit.

Clusters stop jobs with SIGTERM (SLURM preemption and time limits, Kubernetes evictions, ``kill``) and
send SIGKILL a grace period later; SLURM's ``--signal=USR1@120`` warns ahead of the limit. Without a
handler the process dies at once and loses everything since its last checkpoint. With one, training
stops at the next step boundary (under DDP: the next ``runtime.log_interval`` boundary, agreed by all
processes, so none is left waiting in a collective), saves, and exits with 128 + the signal number;
``kdzoo train ... --resume`` continues bit-exactly. A second signal of the same kind kills at once
(a second Ctrl-C: KeyboardInterrupt, as without kdzoo).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))


class TrainingStopped(Exception):
    """Training stopped on request after writing a checkpoint; the run can be resumed."""

    def __init__(self, signum: int, run_dir: Path, position: str):
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at {position}; a checkpoint of that point is in {run_dir}. "
                         "Continue with the same command plus --resume.")


class StopRequests:
    """Context manager: while active, the stop signals set ``signum`` instead of killing the process.
    Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signum:  # asked twice: the default action now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum
        if signum == signal.SIGINT:
            print("\nkdzoo: stopping after this step with a checkpoint (Ctrl-C again to abort)", file=sys.stderr)
