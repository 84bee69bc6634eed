"""Helpers the examples share for writing their results files (not part of the library).

Example::

    >>> compact({"a": 0.123456789, "b": (1, 2)})
    {'a': 0.1234568, 'b': [1, 2]}
    >>> shown_args(["--quick", "--out", "/tmp/x", "--seeds", "3"])
    ['--quick', '--seeds', '3']
"""

from __future__ import annotations

import math

from torch import Tensor


def compact(obj):
    """Floats rounded to 7 significant digits, tuples and tensors as lists (a smaller JSON file)."""
    if isinstance(obj, float):
        return float(f"{obj:.7g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: compact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [compact(v) for v in obj]
    if isinstance(obj, Tensor):
        return compact(obj.tolist())
    return obj


def shown_args(argv: list[str]) -> list[str]:
    """The command-line arguments without ``--out DIR`` (the written files do not depend on it)."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            shown.append(a)
    return shown
