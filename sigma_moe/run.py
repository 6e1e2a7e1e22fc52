"""Run assembly: what ``sigma-moe train`` trains, built from the run config's sections.

The layers below never reach up: ``sigma_moe.train`` runs a loop over a ``Sampler`` and an
``Objective`` it is given; the data-centric policies (``sigma_moe.rho1``, ``sigma_moe.mixing``)
implement those interfaces. This module picks them: the Rho-1 objective when ``rho1.mode``
selects tokens (unless the caller brings one among ``extra_callbacks``), and the sampler of
``data.mixing.kind`` (``sigma_moe.run_mixing``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sigma_moe import run_mixing
from sigma_moe.config import RunConfig
from sigma_moe.rho1.callback import Rho1Callback
from sigma_moe.train.hooks import Objective


def build_objective(cfg: RunConfig, out_dir: str | Path) -> Objective | None:
    """The Rho-1 objective of ``cfg.rho1`` (None: plain causal LM)."""
    return Rho1Callback(cfg.rho1, out_dir, run_config=cfg) if cfg.rho1.mode != "none" else None


def run_training(
    cfg: RunConfig,
    out_dir: str | Path,
    resume: str = "none",
    extra_callbacks: list | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` (see ``sigma_moe.train.loop.run_training``) with the
    objective and sampler the config names."""
    extra = list(extra_callbacks or [])
    objective = None
    if not any(isinstance(cb, Objective) for cb in extra):
        objective = build_objective(cfg, out_dir)
    return run_mixing.run_training(cfg, out_dir, resume, extra, objective=objective)
