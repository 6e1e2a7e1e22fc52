"""Run configuration: one ``*Config`` dataclass per component, each with ``validate()``.

YAML only sets values. Every key is checked against the dataclass field it names (type and
range); unknown keys and bad values raise ``ConfigError`` naming the full dotted key, so a typo in
a recipe or a ``--set`` override never silently becomes a default. Checks that span sections
(top-k vs the model's layers and experts, ep_size vs num_experts, the batch vs ep_size) run in
``RunConfig.validate`` at load time too.

* ``base.py``: ``ConfigError`` and ``check``.
* ``model.py``: ``ModelConfig`` (preset + overrides) and ``build`` -> ``SigmaMoEConfig``.
* ``sections.py``: the data, Rho-1, train, parallel, checkpoint and logging sections.
* ``recipe.py``: ``RunConfig`` (all sections, cross-section checks, ``build_model``).
* ``loading.py``: YAML / ``--set`` loading and saving.
"""

from sigma_moe.config.base import ConfigError
from sigma_moe.config.loading import (
    apply_overrides,
    config_from_dict,
    load_config,
    parse_overrides,
    save_config,
)
from sigma_moe.config.model import ModelConfig, TopkPhase
from sigma_moe.config.recipe import RunConfig
from sigma_moe.config.sections import (
    CheckpointConfig,
    DataConfig,
    DomainConfig,
    LoggingConfig,
    MixingConfig,
    ParallelConfig,
    Rho1Config,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DomainConfig",
    "LoggingConfig",
    "MixingConfig",
    "ModelConfig",
    "ParallelConfig",
    "Rho1Config",
    "RunConfig",
    "TopkPhase",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "parse_overrides",
    "save_config",
]
