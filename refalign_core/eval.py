"""Deprecated (removed in 0.3): `python -m refalign_core.eval` is now `python -m refalign_core eval`, and this module
is `refalign_core.metrics.eval`."""

import sys

from .deprecated import warn
from .metrics.eval import *  # noqa: F401,F403 (the old module's names)
from .metrics.eval import main

if __name__ == "__main__":
    warn("python -m refalign_core.eval", "python -m refalign_core eval")
    sys.exit(main())
warn("refalign_core.eval", "refalign_core.metrics.eval")
