"""Hugging Face round trip: `export_hf` (our checkpoint → transformers Qwen3-MoE folder) and
`import_hf` (the inverse, as one of our checkpoints that trains, scores and exports)."""

from sigma_moe.export.hf import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
