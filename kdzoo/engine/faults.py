"""Fault injection for the crash tests: SIGKILL the process at a named point of the training loop.

Off unless ``KDZOO_FAULT`` is set, e.g. ``KDZOO_FAULT="point=during_save,count=2"`` kills the process
the 2nd time it reaches ``during_save``. ``once=PATH`` fires only if PATH does not exist yet (and
creates it), so a restarted worker survives; ``rank=R`` limits it to one distributed rank. A real
SIGKILL, not an exception: nothing gets to clean up, exactly like an OOM kill or a pulled plug.
``signal=TERM`` (or any other name) sends that signal instead, as a cluster stopping the job would.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

POINTS = ("step", "after_save", "during_save")
_hits: Counter[str] = Counter()


def _spec() -> dict[str, str] | None:
    raw = os.environ.get("KDZOO_FAULT")
    if not raw:
        return None
    return dict(item.split("=", 1) for item in raw.split(","))


def fault_point(point: str) -> None:
    spec = _spec()
    if spec is None or spec.get("point") != point:
        return
    if "rank" in spec and spec["rank"] != os.environ.get("RANK", "0"):
        return
    _hits[point] += 1
    if _hits[point] != int(spec.get("count", "1")):
        return
    once = spec.get("once")
    if once:
        if Path(once).exists():
            return
        Path(once).touch()
    os.kill(os.getpid(), getattr(signal, "SIG" + spec.get("signal", "KILL")))
