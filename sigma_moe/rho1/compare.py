"""Compare two reference-loss stores over the rows both hold (e.g. one scored by an fp32 and one
by a bf16 reference): how far the losses move and how much of the token selection changes."""

from __future__ import annotations

import os

import torch

from sigma_moe.rho1.selection import select_mask
from sigma_moe.rho1.store import RefLossStore


def _common_rows(a: RefLossStore, b: RefLossStore) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows both hold, as [N, S] each: only stores of the same samples are comparable (same
    seq_len; per common domain the same size and identity, i.e. seed and order)."""
    if a.meta["seq_len"] != b.meta["seq_len"]:
        raise ValueError(
            f"stores {a.root} and {b.root} differ in seq_len: "
            f"{a.meta['seq_len']} vs {b.meta['seq_len']}"
        )
    rows_a, rows_b = [], []
    for name, info in a.meta["domains"].items():
        if name not in b.meta["domains"]:
            continue
        if b.meta["domains"][name] != info:
            raise ValueError(
                f"stores {a.root} and {b.root} hold different samples of domain {name!r}: "
                f"{info} vs {b.meta['domains'][name]}"
            )
        for i in range(int(info["size"])):
            if a.has(name, i) and b.has(name, i):
                rows_a.append(a.get(name, i))
                rows_b.append(b.get(name, i))
    if not rows_a:
        raise ValueError(f"stores {a.root} and {b.root} hold no row in common")
    return torch.stack(rows_a), torch.stack(rows_b)


def compare_stores(
    path_a: str | os.PathLike, path_b: str | os.PathLike, ratio: float = 0.6, batch: int = 8
) -> dict[str, float]:
    """Over the rows both stores hold: |L_b - L_a| (mean, max) on valid tokens (stored loss > 0:
    masked tokens are stored as 0), and the share of valid tokens whose selection differs when
    the top ``ratio`` of each ``batch`` rows is kept by ``-L_ref`` (``rho1.mode=reference``,
    where the reference's own error moves the selection most; in ``excess`` mode the same target
    loss is subtracted on both sides)."""
    la, lb = _common_rows(RefLossStore(path_a, mode="r"), RefLossStore(path_b, mode="r"))
    valid = la > 0
    diff = (lb - la).abs()[valid]
    changed = 0
    for s in range(0, len(la), batch):
        v = valid[s : s + batch]
        ma = select_mask(-la[s : s + batch], v, ratio)
        mb = select_mask(-lb[s : s + batch], v, ratio)
        changed += int((ma != mb).sum())
    return {
        "rows": len(la),
        "tokens": int(valid.sum()),
        "abs_diff_mean": float(diff.mean()),
        "abs_diff_max": float(diff.max()),
        "selection_changed": changed / max(1, int(valid.sum())),
    }
