"""`python -m refalign_core.prepare --config my.yaml --out report/` (or `--dataset PATH`): check a training dataset
and write a report before any model is loaded. The work is `refalign_core.training.report`."""

import sys

from .training.report import main

if __name__ == "__main__":
    sys.exit(main())
