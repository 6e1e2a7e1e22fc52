"""Experiments: whole runs assembled from the layers below (they may import everything).

* ``demo.py``: ``sigma-moe demo`` (train the demo-cpu MoE, then the Rho-1 experiment, a report).
* ``rho1.py``: the Rho-1 experiment (CLM vs SLM on a noisy mix; ``scripts/rho1_demo.py``).
* ``balancing.py``: the load-balancing options at 96 experts on 2 processes
  (``scripts/balancing_experiment.py``, docs/balancing.md).
* ``mixing.py``: the domain-mixing arms (``scripts/mixing_experiment.py``, docs/mixing.md).

Each trains through ``sigma_moe.run.run_training`` (the run assembly ``sigma-moe train`` uses),
so the objective and the sampler are the ones the config names.

The recipes they train live in the checkout's ``configs/``, reached as the package resource
``sigma_moe/configs`` (a link to it) with ``config_path``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def config_path(name: str) -> Path:
    """The bundled recipe ``configs/<name>``; a clear error where the checkout lacks it."""
    p = Path(str(resources.files("sigma_moe") / "configs" / name))
    if not p.is_file():
        raise FileNotFoundError(
            f"recipe {p} not found (run the experiments from a sigma-moe checkout)"
        )
    return p
