"""scripts/ep_collectives.py on 2 gloo processes at test-tiny sizes: it trains, times every
collective on both ranks and reports the all-to-alls an EP=2 step makes (5 a layer)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sigma_moe.bench import train as bench_train
from sigma_moe.train.engine import child_env, shm_has_room

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("balanced", [False, True], ids=["routed", "balanced"])
def test_collectives_are_timed_on_both_ranks(balanced):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "scripts" / "ep_collectives.py"), "--quick", "--experts", "8",
           "--steps", "4", "--warmup", "1"] + (["--balanced"] if balanced else [])  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env())
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        m = re.search(rf"rank {rank}: median step ([\d.]+) ms", p.stdout)
        assert m and float(m.group(1)) > 0, p.stdout
    calls = [int(c) for c in re.findall(r"all_to_all_single .*\((\d+) calls\)", p.stdout)]
    layers = bench_train._recipe(8, 4, True, 2, 2).build_model(8192).num_layers
    # a layer: the counts, the rows out and back, and the two backward exchanges
    assert calls == [5 * layers] * 2, p.stdout
    # torchrun on one machine: the dense gradients went through shared memory on both ranks
    if shm_has_room(2):
        assert p.stdout.count("GradSum on shared memory: [True]") == 2, p.stdout
