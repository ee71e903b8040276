"""Reading dataset pickles without executing code from the file.

CIFAR's python files are pickles of a dict of lists, strings and one numpy array. A plain
``pickle.load`` would run any callable the file names; this unpickler resolves only the few globals
that format needs (numpy's array reconstruction) and refuses everything else.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from kdzoo.errors import UserInputError

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Python-2 pickles (the official CIFAR files) encode byte strings through _codecs.encode.
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: not part of the dataset format")


def load_pickle(path: str | Path) -> Any:
    """Load a dataset pickle safely; any refusal or corruption becomes a :class:`UserInputError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserInputError(f"cannot read dataset file {path}: {exc.strerror}") from None
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:  # any failure here means the file is not a valid dataset pickle
        raise UserInputError(f"dataset file {path} is corrupt or not a CIFAR pickle ({exc})") from None
