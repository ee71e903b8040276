"""Datasets kdzoo converts on first use (the demos' nuclei and tree tiles) are written once, atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_directory_once(final: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """``final``, written by ``write(directory)`` unless ``final/marker`` exists already. The writer fills a
    temporary sibling that is then renamed into place, so a present directory is complete; concurrent processes
    (DDP ranks) may race: the first rename wins and the others discard their copy."""
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(tmp / final.name)
        try:
            os.rename(tmp / final.name, final)
        except OSError:
            if not (final / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
