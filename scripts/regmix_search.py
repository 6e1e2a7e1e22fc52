"""RegMix pilot search (same as `sigma-moe mix-search`): proxies on random mixtures of a recipe's
domains, a regression from mixture to target validation loss, the proposed mixture.

    python scripts/regmix_search.py configs/demo-cpu.yaml --out runs/regmix [--proxies 48]
        [--parallel 2] [--targets prose,code] [--model quadratic|linear|gbm] [--set k=v ...]

Resumable: run the same command again after a kill. Outputs in --out: proxies.jsonl,
regmix.json, proposed.yaml (a data.domains fragment), plots/regmix_fit.png.
"""

import sys

from sigma_moe.mixing.regmix import main

if __name__ == "__main__":
    sys.exit(main())
