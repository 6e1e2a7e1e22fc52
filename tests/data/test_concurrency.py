"""Several processes building the same data at once: the bundled cache and megatron indices."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _env(cache):
    env = dict(os.environ)
    env["SIGMA_MOE_CACHE"] = str(cache)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_two_processes_build_bundled_cache_once(tmp_path):
    code = textwrap.dedent(
        """
        import json, sys
        from sigma_moe.data.bundled import ensure_bundled_data
        d = ensure_bundled_data()
        print(json.dumps({"dir": str(d), "marker": (d / "COMPLETE.json").read_text()}))
        """
    )
    env = _env(tmp_path / "cache")
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]  # same folder, same marker: built once, by one of them
    entries = sorted(x.name for x in (tmp_path / "cache").iterdir())
    assert [e for e in entries if not e.startswith(".bundled.lock")] == [Path(outs[0]["dir"]).name]


_DIST_WORKER = textwrap.dedent(
    """
    import os, sys, json
    import torch, torch.distributed as dist
    rank, world, port, prefix, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from sigma_moe.data.dataset import DomainSpec, build_train_dataset
    doms = [DomainSpec("a", prefix + "/a", 0.7), DomainSpec("b", prefix + "/b", 0.3)]
    ds = build_train_dataset(doms, 32, 300, seed=5)
    rows = [ds[i]["input_ids"][:8].tolist() + list(ds.domain_and_index(i)) for i in range(0, 300, 37)]
    json.dump(rows, open(out, "w"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.distributed
def test_two_ranks_build_indices_on_rank0(tmp_path):
    import socket

    from sigma_moe.data.prepare import prepare_data

    for name, word in (("a", "alpha"), ("b", "beta")):
        src = tmp_path / f"{name}.txt"
        src.write_text("\n\n".join(f"{word} {i} " + "x " * (i % 9) for i in range(400)))
        prepare_data([src], name, tmp_path / "data", val_fraction=0.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(tmp_path / "cache")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _DIST_WORKER,
                str(r),
                "2",
                str(port),
                str(tmp_path / "data"),
                str(tmp_path / f"out{r}.json"),
            ],
            env=env,
        )  # fmt: skip
        for r in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0
    r0 = json.loads((tmp_path / "out0.json").read_text())
    r1 = json.loads((tmp_path / "out1.json").read_text())
    assert r0 == r1 and len(r0) == 9
    assert (tmp_path / "data" / "a" / "cache" / "GPTDataset_indices").is_dir()
