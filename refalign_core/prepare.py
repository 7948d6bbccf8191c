"""Deprecated (removed in 0.3): `python -m refalign_core.prepare` is now `python -m refalign_core prepare`."""

import sys

from .deprecated import warn
from .training.report import main

if __name__ == "__main__":
    warn("python -m refalign_core.prepare", "python -m refalign_core prepare")
    sys.exit(main())
