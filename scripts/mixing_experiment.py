"""Domain-mixing experiment (docs/mixing.md): uniform vs natural static weights vs online-doremi
vs online-bandit vs the RegMix-proposed mixture, at equal steps and seed.

    python scripts/mixing_experiment.py --out runs/mixing --regmix runs/mixing/regmix --seeds 0,1,2
"""

import sys

from sigma_moe.experiments.mixing import main

if __name__ == "__main__":
    sys.exit(main())
