"""Sigma-MoE model: `from sigma_moe.model import SigmaMoEConfig, SigmaMoEForCausalLM`."""

from sigma_moe.model.config import PRESETS, SigmaMoEConfig
from sigma_moe.model.lm import CausalLMOutput, SigmaMoEForCausalLM

__all__ = ["PRESETS", "CausalLMOutput", "SigmaMoEConfig", "SigmaMoEForCausalLM"]
