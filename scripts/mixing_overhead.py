"""Per-step cost of the online mixer's bookkeeping (DomainLosses + domain x expert counts +
feedback + state_dict) at demo-cpu batch shapes, vs a demo-cpu training step."""

import time
from types import SimpleNamespace

import torch

from sigma_moe.mixing.online import DoReMiSampler
from sigma_moe.train.domain_stats import domain_expert_counts
from sigma_moe.train.sampling import DomainLosses

torch.set_num_threads(1)
B, S, L, E, K = 8, 256, 4, 32, 4
stats = [
    SimpleNamespace(
        tokens_per_expert_E=torch.zeros(E, dtype=torch.long),
        experts_TK=torch.randint(0, E, (B * S, 1)),
    )
    for _ in range(L)
]
s = DoReMiSampler(list("abcd"), B, [0.3, 0.2, 0.2, 0.3], 10, 0.01)
ce = torch.rand(B, S)
ref = torch.rand(B, S)
valid = torch.ones(B, S, dtype=torch.bool)
n = 300
t0 = time.perf_counter()
for step in range(n):
    keys = s.keys_for_step(step)
    dom = torch.tensor([d for d, _ in keys])
    dl = DomainLosses.zeros(K)
    dl.add_micro_batch(ce, valid, dom, ref)
    c = domain_expert_counts(stats, dom, K)
    s.feedback(step, dl)
    st = s.state_dict()
dt = (time.perf_counter() - t0) / n
print(f"mixer bookkeeping per step (B={B}, S={S}, L={L}, E={E}, K={K}): {dt * 1e3:.2f} ms")
