"""python -m vramplan.perf tests/data/calibration/measured.csv tests/data/h200-grid/measured.csv"""

import json
import sys

from .calibrate import refit

print(json.dumps(refit(sys.argv[1:] or ["tests/data/calibration/measured.csv", "tests/data/h200-grid/measured.csv"]),
                 indent=1))
