"""Rho-1 token selection (pure torch; no process machinery).

Per token the trainer has its own CE (from the forward pass it does anyway) and the frozen
reference model's CE (from the reference-loss store). The score is

- ``excess``:    ``ce.detach() - ref``  (the paper's default: learnable, not yet learnt),
- ``reference``: ``-ref``               (keep the tokens the reference finds easiest),
- ``none``:      no selection, every valid token has weight 1.

Exactly ``num_selected(n_valid, ratio)`` valid tokens of a *scope* get weight 1; the other valid
tokens get ``unselected_weight`` and invalid (masked / padding) tokens get 0. The scope is one
micro-batch of one rank (``group=None``) or the same micro-step across a process group (one
threshold for the whole group, so the result does not depend on how the batch is split).

Because the count is exact and known from the valid-token counts alone, the trainer can compute
the loss denominator Σw of a whole global batch *before* running the forward passes (see
``weight_sum``), and normalise Σ w·CE by it so that 1, 2 or 4 processes give the same loss.

Ties are broken deterministically: among equal scores the lower flat index wins (flat index over
the scope's tokens in row-major order; in global scope ranks are concatenated in rank order, i.e.
exactly as if the micro-batches were concatenated along the batch dimension).
"""

from __future__ import annotations

import math
from decimal import Decimal

import torch

MODES = ("none", "excess", "reference")


def num_selected(n_valid: int, ratio: float) -> int:
    """How many of ``n_valid`` tokens a scope selects: ``ceil(ratio * n_valid)``, 0 if none.

    Computed in exact decimal arithmetic on the ratio as written (``0.6 * 5`` is 3, not the 4 a
    float ``ceil(3.0000000000000004)`` would give), so every process agrees on the count. For
    ``0 < ratio <= 1`` and ``n_valid > 0`` the result is in ``[1, n_valid]``.
    """
    n_valid = int(n_valid)
    if n_valid < 0:
        raise ValueError(f"n_valid must be >= 0, got {n_valid}")
    if not 0 < ratio <= 1:
        raise ValueError(f"select ratio must be in (0, 1], got {ratio}")
    if n_valid == 0:
        return 0
    k = math.ceil(Decimal(repr(float(ratio))) * n_valid)
    return max(1, min(n_valid, k))


def weight_sum(n_valid: int, *, mode: str, ratio: float, unselected_weight: float = 0.0) -> float:
    """Σ weights that ``token_weights`` will produce for a scope with ``n_valid`` valid tokens.

    The trainer sums this over the scopes of a global batch (rank scope: every micro-batch of
    every rank; global scope: every micro-step, with ``n_valid`` summed over the group) to get
    the loss denominator before the forward passes.
    """
    _check_mode(mode)
    if mode == "none":
        return float(n_valid)
    k = num_selected(n_valid, ratio)
    return float(k) + float(unselected_weight) * float(n_valid - k)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"rho1 mode must be one of {list(MODES)}, got {mode!r}")


def token_scores(ce_BS: torch.Tensor, ref_BS: torch.Tensor, mode: str) -> torch.Tensor:
    """The selection score (higher = keep), float32, detached."""
    _check_mode(mode)
    if mode == "excess":
        return ce_BS.detach().float() - ref_BS.detach().float()
    if mode == "reference":
        return -ref_BS.detach().float()
    return torch.zeros_like(ce_BS, dtype=torch.float32)


def _topk_mask_flat(score_N: torch.Tensor, valid_N: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k best valid entries; ties → lower index; invalid never selected."""
    sel_N = torch.zeros_like(valid_N)
    if k == 0:
        return sel_N
    # NaN scores (should not happen for valid tokens) rank last among valid ones.
    s = torch.nan_to_num(score_N.float(), nan=-math.inf)
    # Stable sort by score (descending), then stable sort by validity (valid first): the result
    # orders valid tokens by score desc, ties by ascending index — a lexicographic order that is
    # fully deterministic and does not rely on sentinels (a valid token may itself score -inf).
    order = torch.sort(s, descending=True, stable=True).indices
    order = order[torch.sort(valid_N[order].to(torch.int8), descending=True, stable=True).indices]
    sel_N[order[:k]] = True
    return sel_N


def select_mask(
    score_BS: torch.Tensor,
    valid_BS: torch.Tensor,
    ratio: float,
    group: object | None = None,
) -> torch.Tensor:
    """Boolean [B, S] mask of exactly ``num_selected(n_valid_scope, ratio)`` selected tokens.

    ``group=None``: scope = this tensor. Otherwise a ``torch.distributed`` process group: the
    scores of all members are all-gathered (every member must pass the same shape — micro-batches
    have equal shapes) and one threshold is applied to the concatenation in rank order.
    """
    valid_BS = valid_BS.bool()
    if score_BS.shape != valid_BS.shape:
        raise ValueError(
            f"score shape {tuple(score_BS.shape)} != valid shape {tuple(valid_BS.shape)}"
        )
    if group is None:
        n_valid = int(valid_BS.sum())
        sel = _topk_mask_flat(
            score_BS.reshape(-1), valid_BS.reshape(-1), num_selected(n_valid, ratio)
        )
        return sel.view_as(valid_BS)

    import torch.distributed as dist

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    # One collective: invalid tokens travel as NaN, valid scores have NaN replaced by -inf.
    s = torch.nan_to_num(score_BS.detach().float(), nan=-math.inf)
    packed_N = torch.where(valid_BS, s, torch.full_like(s, math.nan)).reshape(-1).contiguous()
    gathered = [torch.empty_like(packed_N) for _ in range(world)]
    dist.all_gather(gathered, packed_N, group=group)
    all_N = torch.cat(gathered)
    all_valid_N = ~torch.isnan(all_N)
    k = num_selected(int(all_valid_N.sum()), ratio)
    sel_all = _topk_mask_flat(all_N, all_valid_N, k)
    n = packed_N.numel()
    return sel_all[rank * n : (rank + 1) * n].view_as(valid_BS)


def token_weights(
    ce_BS: torch.Tensor,
    ref_BS: torch.Tensor | None,
    valid_BS: torch.Tensor,
    *,
    mode: str,
    ratio: float,
    unselected_weight: float = 0.0,
    group: object | None = None,
    return_selected: bool = False,
):
    """Per-token loss weights (float32 [B, S]): 1 selected, ``unselected_weight`` rejected valid,
    0 invalid. ``mode="none"`` → ``valid`` as float (``ref_BS`` may be None).

    With ``return_selected=True`` returns ``(weights_BS, selected_BS)``.
    """
    _check_mode(mode)
    valid_BS = valid_BS.bool()
    if mode == "none":
        w = valid_BS.float()
        return (w, valid_BS.clone()) if return_selected else w
    if ref_BS is None:
        raise ValueError(f"rho1 mode {mode!r} needs reference losses (ref_BS is None)")
    if ce_BS.shape != ref_BS.shape or ce_BS.shape != valid_BS.shape:
        raise ValueError(
            f"shape mismatch: ce {tuple(ce_BS.shape)}, ref {tuple(ref_BS.shape)}, "
            f"valid {tuple(valid_BS.shape)}"
        )
    score = token_scores(ce_BS, ref_BS, mode)
    sel = select_mask(score, valid_BS, ratio, group)
    w = torch.where(
        sel,
        torch.ones_like(score),
        torch.where(
            valid_BS, torch.full_like(score, float(unselected_weight)), torch.zeros_like(score)
        ),
    )
    return (w, sel) if return_selected else w


# --------------------------------------------------------------------------- metrics


def selection_stats(
    selected_BS: torch.Tensor,
    valid_BS: torch.Tensor,
    excess_BS: torch.Tensor,
    domain_B: torch.Tensor | None = None,
    num_domains: int | None = None,
) -> dict[str, float]:
    """Additive sums (merge micro-batches / ranks by adding them, then ``metrics_from_stats``)."""
    sel = selected_BS.bool() & valid_BS.bool()
    valid = valid_BS.bool()
    rej = valid & ~sel
    ex = torch.nan_to_num(excess_BS.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    st: dict[str, float] = {
        "n_valid": float(valid.sum()),
        "n_selected": float(sel.sum()),
        "excess_sum_selected": float(ex[sel].sum()),
        "excess_sum_rejected": float(ex[rej].sum()),
    }
    if domain_B is not None:
        dom = domain_B.reshape(-1).long()
        nd = num_domains if num_domains is not None else int(dom.max()) + 1 if dom.numel() else 0
        v_B = valid.sum(dim=1).float()
        s_B = sel.sum(dim=1).float()
        for d in range(nd):
            m = dom == d
            if num_domains is None and not bool(m.any()):
                continue
            st[f"n_valid/{d}"] = float(v_B[m].sum())
            st[f"n_selected/{d}"] = float(s_B[m].sum())
    return st


# Bin edges (nats) of the run's excess-loss histogram; the outer bins also hold the tails.
EXCESS_HIST_EDGES = [round(-6.0 + 0.2 * i, 1) for i in range(61)]


def excess_histogram(
    selected_BS: torch.Tensor, valid_BS: torch.Tensor, excess_BS: torch.Tensor
) -> dict[str, float]:
    """Additive counts ``excess_hist/{selected,rejected}/<bin>`` of the valid tokens' excess
    loss over ``EXCESS_HIST_EDGES`` (values beyond the ends count in the outer bins)."""
    sel = selected_BS.bool() & valid_BS.bool()
    rej = valid_BS.bool() & ~sel
    ex = torch.nan_to_num(excess_BS.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    edges = torch.tensor(EXCESS_HIST_EDGES)
    nb = len(EXCESS_HIST_EDGES) - 1
    out: dict[str, float] = {}
    for name, m in (("selected", sel), ("rejected", rej)):
        idx = (torch.bucketize(ex[m], edges, right=True) - 1).clamp(0, nb - 1)
        counts = torch.bincount(idx, minlength=nb)
        out.update({f"excess_hist/{name}/{i}": float(c) for i, c in enumerate(counts)})
    return out


def merge_stats(*stats: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in stats:
        for k, v in s.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def metrics_from_stats(
    st: dict[str, float], domain_names: list[str] | None = None
) -> dict[str, float]:
    """``selected_frac``, ``selected_frac/<domain>``, ``excess_loss_selected``,
    ``excess_loss_rejected`` (NaN where a count is 0)."""

    def div(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    n_sel, n_val = st.get("n_selected", 0.0), st.get("n_valid", 0.0)
    out = {
        "selected_frac": div(n_sel, n_val),
        "excess_loss_selected": div(st.get("excess_sum_selected", 0.0), n_sel),
        "excess_loss_rejected": div(st.get("excess_sum_rejected", 0.0), n_val - n_sel),
    }
    for k in st:
        if k.startswith("n_valid/"):
            d = k.split("/", 1)[1]
            name = domain_names[int(d)] if domain_names is not None else d
            out[f"selected_frac/{name}"] = div(st.get(f"n_selected/{d}", 0.0), st[k])
    return out


def selection_metrics(
    weights_BS: torch.Tensor,
    valid_BS: torch.Tensor,
    score_BS: torch.Tensor,
    domain_B: torch.Tensor | None = None,
    *,
    selected_BS: torch.Tensor | None = None,
    domain_names: list[str] | None = None,
    num_domains: int | None = None,
) -> dict[str, float]:
    """Selected fraction overall and per domain; mean excess (``score_BS``; pass ``ce - ref``)
    of the selected vs the rejected valid tokens.

    Selected tokens are those with weight 1 unless ``selected_BS`` is given (pass it when
    ``unselected_weight == 1``, where weights cannot tell them apart). Per-domain keys use
    ``domain_names[id]`` if given, else the domain id.
    """
    if selected_BS is None:
        selected_BS = (weights_BS == 1) & valid_BS.bool()
    st = selection_stats(selected_BS, valid_BS, score_BS, domain_B, num_domains)
    return metrics_from_stats(st, domain_names)
