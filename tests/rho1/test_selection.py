import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sigma_moe.rho1.selection import (
    merge_stats,
    metrics_from_stats,
    num_selected,
    select_mask,
    selection_metrics,
    selection_stats,
    token_weights,
    weight_sum,
)


def test_num_selected_exact():
    assert num_selected(0, 0.6) == 0
    assert num_selected(5, 0.6) == 3  # float 0.6*5 = 3.0000000000000004 must not round up to 4
    assert num_selected(10, 0.7) == 7
    assert num_selected(3, 0.7) == 3  # ceil(2.1)
    assert num_selected(7, 1.0) == 7
    assert num_selected(1000, 1e-9) == 1  # tiny ratio still keeps one token
    assert num_selected(1, 0.01) == 1
    for n in range(0, 300):
        for r in (0.1, 0.25, 0.3, 0.6, 0.7, 0.9, 1.0):
            k = num_selected(n, r)
            assert k == (0 if n == 0 else max(1, math.ceil(round(r * n, 9))))
    with pytest.raises(ValueError):
        num_selected(5, 0.0)
    with pytest.raises(ValueError):
        num_selected(5, 1.5)


def test_hand_computation_excess_ties_and_padding():
    # ce - ref per token; row 1 has two padded tokens.
    ce = torch.tensor([[3.0, 1.0, 2.0, 2.0], [5.0, 2.0, 9.0, 9.0]])
    ref = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    # excess: [[2, 0, 1, 1], [4, 1, (9), (9)]]; 6 valid, ratio 0.5 -> 3 selected:
    # 4 (idx 4), 2 (idx 0), then a three-way tie at 1 (idx 2, 3, 5) -> lowest index 2 wins.
    w = token_weights(ce, ref, valid, mode="excess", ratio=0.5)
    assert w.dtype == torch.float32
    assert w.tolist() == [[1, 0, 1, 0], [1, 0, 0, 0]]
    # Padding is never selected even though it has the highest score.
    w = token_weights(ce, ref, valid, mode="excess", ratio=1.0)
    assert w.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    w = token_weights(ce, ref, valid, mode="excess", ratio=0.5, unselected_weight=0.1)
    assert torch.allclose(w, torch.tensor([[1, 0.1, 1, 0.1], [1, 0.1, 0, 0]]))
    assert float(w.sum()) == pytest.approx(
        weight_sum(6, mode="excess", ratio=0.5, unselected_weight=0.1)
    )


def test_reference_mode_keeps_lowest_ref():
    ce = torch.zeros(1, 5)
    ref = torch.tensor([[0.5, 3.0, 0.1, 0.5, 2.0]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    w = token_weights(ce, ref, valid, mode="reference", ratio=0.6)  # 3 of 5
    assert w.tolist() == [[1, 0, 1, 1, 0]]


def test_mode_none_and_all_masked():
    ce = torch.randn(2, 3)
    valid = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    assert token_weights(ce, None, valid, mode="none", ratio=0.6).tolist() == valid.float().tolist()
    z = torch.zeros(2, 3, dtype=torch.bool)
    w = token_weights(ce, torch.full((2, 3), math.nan), z, mode="excess", ratio=0.6)
    assert w.tolist() == [[0, 0, 0], [0, 0, 0]] and not torch.isnan(w).any()
    m = selection_metrics(w, z, ce, torch.tensor([0, 1]))
    assert math.isnan(m["selected_frac"])  # reported as NaN, not a crash
    assert weight_sum(0, mode="excess", ratio=0.6) == 0.0


def test_gradient_not_through_score_and_nan_ref():
    ce = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    ref = torch.tensor([[0.0, math.nan, 0.0]])  # a NaN score ranks last among valid tokens
    w = token_weights(ce, ref, torch.ones(1, 3, dtype=torch.bool), mode="excess", ratio=0.6)
    assert w.tolist() == [[1, 0, 1]] and not w.requires_grad


def test_exact_count_random():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        B, S = torch.randint(1, 5, (2,), generator=g).tolist()
        valid = torch.rand(B, S, generator=g) > 0.3
        # Quantised scores -> many ties.
        ce = torch.randint(0, 3, (B, S), generator=g).float()
        ref = torch.randint(0, 3, (B, S), generator=g).float()
        r = float(torch.rand(1, generator=g)) * 0.99 + 0.01
        w = token_weights(ce, ref, valid, mode="excess", ratio=r)
        assert int((w == 1).sum()) == num_selected(int(valid.sum()), r)
        assert not bool(((w == 1) & ~valid).any())
        # brute force: selected = first k of sorted (score desc, index asc) among valid
        s = (ce - ref).reshape(-1).tolist()
        idx = [i for i in range(B * S) if valid.reshape(-1)[i]]
        idx.sort(key=lambda i: (-s[i], i))
        want = set(idx[: num_selected(len(idx), r)])
        got = set(torch.nonzero(w.reshape(-1) == 1).reshape(-1).tolist())
        assert got == want


def test_metrics_per_domain():
    valid = torch.ones(2, 4, dtype=torch.bool)
    sel = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    ex = torch.tensor([[3.0, 3.0, 3.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    m = selection_metrics(
        sel.float(), valid, ex, torch.tensor([0, 3]), domain_names=["a", "b", "c", "d"]
    )
    assert m["selected_frac"] == pytest.approx(0.5)
    assert m["selected_frac/a"] == pytest.approx(0.75)
    assert m["selected_frac/d"] == pytest.approx(0.25)
    assert "selected_frac/b" not in m
    assert m["excess_loss_selected"] == pytest.approx(11 / 4)
    assert m["excess_loss_rejected"] == pytest.approx(1 / 4)
    s1 = selection_stats(sel[:1], valid[:1], ex[:1], torch.tensor([0]))
    s2 = selection_stats(sel[1:], valid[1:], ex[1:], torch.tensor([3]))
    m2 = metrics_from_stats(merge_stats(s1, s2), ["a", "b", "c", "d"])
    assert m2 == m


# --------------------------------------------------------------------------- global scope


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_worker(rank, world, port, ce, ref, valid, ratio, out_dir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        B = ce.shape[0] // world
        sl = slice(rank * B, (rank + 1) * B)
        w = token_weights(
            ce[sl], ref[sl], valid[sl], mode="excess", ratio=ratio, group=dist.group.WORLD
        )
        torch.save(w, os.path.join(out_dir, f"w{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_global(ce, ref, valid, ratio, world, out_dir):
    mp.start_processes(
        _global_worker,
        args=(world, _free_port(), ce, ref, valid, ratio, str(out_dir)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return torch.cat([torch.load(os.path.join(out_dir, f"w{r}.pt")) for r in range(world)])


@pytest.mark.distributed
def test_global_scope_matches_concatenated_batch(tmp_path):
    g = torch.Generator().manual_seed(1)
    B, S = 4, 16
    ce = torch.randint(0, 4, (B, S), generator=g).float()  # ties across ranks
    ref = torch.randint(0, 4, (B, S), generator=g).float()
    valid = torch.rand(B, S, generator=g) > 0.25
    valid[0] = False  # one fully masked row on rank 0
    ratio = 0.6
    want = token_weights(ce, ref, valid, mode="excess", ratio=ratio)
    got = _run_global(ce, ref, valid, ratio, world=2, out_dir=tmp_path)
    assert torch.equal(got, want)
    # rank scope differs in general (per-rank counts), global scope does not depend on the split
    per_rank = torch.cat(
        [
            token_weights(
                ce[i : i + 2], ref[i : i + 2], valid[i : i + 2], mode="excess", ratio=ratio
            )
            for i in (0, 2)
        ]
    )
    assert int((per_rank == 1).sum()) == sum(
        num_selected(int(valid[i : i + 2].sum()), ratio) for i in (0, 2)
    )


def test_select_mask_single_process_group_none():
    s = torch.tensor([[1.0, 1.0, 1.0]])
    v = torch.ones(1, 3, dtype=torch.bool)
    assert select_mask(s, v, 0.5).tolist() == [[True, True, False]]


def test_callback_weight_sum_rank_and_global():
    from sigma_moe.config import RunConfig
    from sigma_moe.rho1.callback import Rho1Callback

    cfg = RunConfig()
    cfg.rho1.mode = "excess"
    cfg.rho1.reference = "x"
    cfg.rho1.select_ratio = 0.6
    cfg.rho1.unselected_weight = 0.1
    cb = Rho1Callback(cfg.rho1, "/tmp", run_config=cfg)
    n_all = torch.tensor([[5.0, 3.0], [2.0, 0.0]], dtype=torch.float64)  # [dp=2, accum=2]
    kw = dict(mode="excess", ratio=0.6, unselected_weight=0.1)
    want_rank = sum(weight_sum(n, **kw) for n in (5, 3, 2, 0))
    assert cb.weight_sum(n_all) == pytest.approx(want_rank)
    cb._group = object()  # global scope: one scope per micro-step, counts summed over ranks
    assert cb.weight_sum(n_all) == pytest.approx(weight_sum(7, **kw) + weight_sum(3, **kw))
