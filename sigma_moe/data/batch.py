"""What a collated batch means to a loss (one place for every caller: the loop, eval, the Rho-1
scorer, the experiments, the training benchmark).

A batch from ``sigma_moe.data.dataset.collate`` holds ``input_ids``, ``labels`` (the next
token), ``loss_mask`` (0 where a label must not count: past an EOD with ``eod_mask_loss``) and,
with ``data.reset_at_eod``, ``doc_ids`` (the document of each token).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


def masked_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``labels`` with ``IGNORE_INDEX`` where ``loss_mask`` is 0 (what the cross-entropy skips)."""
    return batch["labels"].masked_fill(batch["loss_mask"] <= 0, IGNORE_INDEX)


def block_causal_mask(doc_BS: torch.Tensor | None) -> torch.Tensor | None:
    """Block-diagonal causal mask [B, S, S] from per-token document ids; True = attend
    (token i attends to j iff j <= i and both are in the same document). None without ids."""
    if doc_BS is None:
        return None
    S = doc_BS.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_BS.device).tril()
    return (doc_BS[:, :, None] == doc_BS[:, None, :]) & causal
