"""Deprecated location of the input checks: they live in :mod:`lightning_repsim.functional.inputs` (re-exported here
for code written against earlier versions)."""

from lightning_repsim.functional.inputs import *  # noqa: F401,F403
from lightning_repsim.functional.inputs import __all__  # noqa: F401
