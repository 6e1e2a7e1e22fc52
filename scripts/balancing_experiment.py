#!/usr/bin/env python
"""Load-balancing experiment (docs/balancing.md); the logic lives in
sigma_moe/experiments/balancing.py:

    python scripts/balancing_experiment.py --out runs/balancing            # all variants
    python scripts/balancing_experiment.py --out /tmp/b --steps 10         # smoke
"""

import sys

from sigma_moe.experiments.balancing import main

if __name__ == "__main__":
    sys.exit(main())
