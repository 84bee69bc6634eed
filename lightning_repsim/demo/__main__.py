"""``python -m lightning_repsim.demo``: see :mod:`lightning_repsim.demo`."""

import sys

from lightning_repsim.demo.run import main

if __name__ == "__main__":
    main(sys.argv[1:])
