"""The online samplers read the same samples on 1 and 2 processes: each rank sees only its own
micro-batches, the per-domain losses are all-reduced (as the loop does), and every rank's keys
and weights equal those of one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1] / "parallel"))

from _dist import run_distributed  # noqa: E402

from sigma_moe.mixing.online import DoReMiSampler, Exp3Sampler  # noqa: E402
from sigma_moe.train.sampling import DomainLosses  # noqa: E402

G, MB, S, STEPS = 8, 2, 4, 12


def _ce(d: int, i: int) -> torch.Tensor:
    """A fixed per-token 'loss' of sample i of domain d (domains differ, samples vary)."""
    g = torch.Generator().manual_seed(1000 * d + i)
    return 1.0 + d + torch.rand(S, generator=g, dtype=torch.float64)


def _trace(kind: str, rank: int, dp: int) -> dict:
    names = ["a", "b", "c"]
    s = (
        DoReMiSampler(names, G, [0.5, 0.3, 0.2], 1, 0.02, lr=0.5)
        if kind == "doremi"
        else Exp3Sampler(names, G, 1, 0.02)
    )
    keys, weights = [], []
    for step in range(STEPS):
        k = s.keys_for_step(step)
        keys.append(k)
        losses = DomainLosses.zeros(3)
        for a in range(G // (MB * dp)):
            j = a * dp + rank
            mine = k[j * MB : (j + 1) * MB]
            ce = torch.stack([_ce(d, i) for d, i in mine])
            dom = torch.tensor([d for d, _ in mine])
            losses.add_micro_batch(ce, torch.ones(MB, S), dom, 0.6 * ce)
        if dp > 1:
            packed = losses.packed()
            dist.all_reduce(packed)
            losses = DomainLosses.unpack(packed, True)
        s.feedback(step, losses)
        weights.append(s.weights())
    return {"keys": keys, "weights": weights}


def _worker(rank: int, world: int, out: str) -> None:
    for kind in ("doremi", "bandit"):
        Path(out, f"{kind}{rank}.json").write_text(json.dumps(_trace(kind, rank, world)))


@pytest.mark.distributed
def test_same_samples_on_one_and_two_processes(tmp_path):
    run_distributed(_worker, 2, str(tmp_path))  # one spawn for both mixers
    for kind in ("doremi", "bandit"):
        one = json.loads(json.dumps(_trace(kind, 0, 1)))
        for r in range(2):
            two = json.loads((tmp_path / f"{kind}{r}.json").read_text())
            assert two["keys"] == one["keys"], kind
            for w1, w2 in zip(one["weights"], two["weights"]):
                assert w2 == pytest.approx(w1, abs=1e-12)
        moved = {tuple(round(x, 6) for x in w) for w in one["weights"]}
        assert len(moved) > 3, "the weights should move (else the test proves nothing)"
