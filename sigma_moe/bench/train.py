"""`sigma-moe bench train`: end-to-end training tokens/s, ours against what a user would try.

Variants (each run is a fresh process; variants alternate round after round, so a noisy
neighbour slows them alike; the table gives the median over rounds):

  ours          `sigma-moe train` itself (run_training on configs/demo-cpu.yaml: its ZeRO stage,
                metrics and logging), top-1 everywhere; with --nproc 2: EP=2 on 2 processes
  hf            transformers' Qwen3MoeForCausalLM of the same size (sigma_moe.export.hf maps our
                config), plain PyTorch loop, fused AdamW, clipping, its fastest experts
                implementation (`--hf-experts`, default grouped_mm)
  hf-ourenv     hf with sigma-moe's process settings (sigma_moe/_threads.py OpenMP waits,
                sigma_moe/_malloc.py); every other peer runs with torch's own defaults (libgomp's
                wait policy, glibc's malloc), as a transformers user's script would
  hf-ds0/hf-ds1 the same model through deepspeed.initialize, ZeRO-0 / ZeRO-1
  autoep        the same model through DeepSpeed AutoEP (`expert_parallel`, preset qwen3_moe,
                its optimizer in the ds_config), EP = the process count
  ours-solo     not a peer: the compute floor of ours at EP=P on P processes. P independent
                runs of ours at once, each a plain 1-process run on 1/P of the global batch with
                E/P experts and cores/P threads: every rank's work of EP=P, no communication
                at all (--nproc 2 and up; its tokens/s count the global batch, the slowest
                run's median step)

Every variant trains on the same batches: ours from the bundled corpus via its sampler, the
peers from the same dataset and sample keys. A step's time covers fetching its batch, forward,
backward, clipping and the optimizer step; the first `--warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sigma_moe.bench.common import (
    describe_machine,
    machine_info,
    markdown_table,
    rotated_rounds,
    write_json,
)
from sigma_moe.data.batch import masked_labels

REPO = Path(__file__).resolve().parents[2]
PEERS = ("hf", "hf-ourenv", "hf-ds0", "hf-ds1", "autoep")
# What a peer's process gets unless it is hf-ourenv: libgomp's default spin count with no wait
# policy (exactly its built-in default; _threads.py leaves both alone when one is set) and
# glibc's own malloc thresholds (a THP_MEM_ALLOC_ENABLE the user exported reaches every variant).
TORCH_DEFAULT_ENV = {"GOMP_SPINCOUNT": "300000", "SIGMA_MOE_MALLOPT": "0"}


def _recipe(experts: int, steps: int, quick: bool, ep_size: int, procs: int = 1, solo_of: int = 1):
    """The recipe every variant trains; on ``procs`` processes each takes 1/procs of the
    global batch in one micro-batch (the same global batch as one process, no accumulation).
    ``solo_of`` = P: one run of ours-solo (1/P of the global batch and of the experts, alone)."""
    from sigma_moe.config import load_config

    path = REPO / "configs" / ("test-tiny.yaml" if quick else "demo-cpu.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `bench train` runs from a source checkout")
    sets = [
        f"model.num_experts={experts // solo_of}",
        "model.topk_schedule=[]",  # top-1 in every layer, as the peers
        f"train.max_steps={steps}",
        "train.log_every=1",
        f"train.eval_every={10**6}",
        f"checkpoint.every={10**6}",
        "logging.wandb_mode=disabled",
        "logging.progress=false",
        "data.val_samples_per_domain=2",
        f"parallel.ep_size={ep_size}",
    ]
    if solo_of > 1 or procs > 1:  # the recipe's own global batch, to split
        full_batch = load_config(path, []).train.global_batch_size
    if solo_of > 1:
        G = full_batch // solo_of
        if experts % solo_of or G < 1:
            raise ValueError(f"ours-solo: {solo_of} processes must divide the experts ({experts}) "
                             "and the global batch")  # fmt: skip
        sets += [f"train.global_batch_size={G}", f"train.micro_batch_size={G}"]
        sets.append("parallel.zero_stage=0")  # as ours at EP=P (below)
    if procs > 1:
        sets.append(f"train.micro_batch_size={full_batch // procs}")
        # the AutoEP peer's stage (_ds_config: ZeRO-0), so both reduce gradients the same way
        # and neither shards its optimizer
        sets.append("parallel.zero_stage=0")
    return load_config(path, sets)


# ---------------------------------------------------------------------------------------------
# workers (one per process)
# ---------------------------------------------------------------------------------------------
def _worker_ours(cfg, run_dir: Path, warmup: int) -> dict:
    from sigma_moe.train.loop import run_training

    run_training(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 writes the metrics
        return {"step_times": [], "losses": []}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    lines = [m for m in lines if "step_time_s" in m]
    return {
        "step_times": [m["step_time_s"] for m in lines][warmup:],
        "losses": [m["lm_loss"] for m in lines],
    }


def _patch_transformers_for_autoep() -> None:
    """DeepSpeed 0.19's AutoEP calls `_CanRecordRegistry.get(key, default)`; transformers 5's
    override takes no default. Patched here only, for this benchmark's process."""
    from transformers.utils import output_capturing as oc

    def get(self, model, default=None):
        key = model if isinstance(model, str) else str(model.__class__)
        v = dict.get(self, key)
        return v if v else ({} if default is None else default)

    oc._CanRecordRegistry.get = get


def _hf_model(mcfg, experts_impl: str):
    from transformers import Qwen3MoeForCausalLM

    from sigma_moe.export.hf import qwen3_config

    cfg = qwen3_config(mcfg, 1, 0, torch.float32)
    model = Qwen3MoeForCausalLM(cfg)
    model.set_experts_implementation(experts_impl)
    return model.train()


def _ds_config(cfg, variant: str, world: int) -> dict:
    tr = cfg.train
    ds = {
        "train_batch_size": tr.global_batch_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.global_batch_size // (tr.micro_batch_size * world),
        "gradient_clipping": tr.grad_clip,
        "zero_optimization": {"stage": 1 if variant == "hf-ds1" else 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if variant == "autoep":
        ds["expert_parallel"] = {"enabled": True, "autoep_size": world, "preset_model": "qwen3_moe"}
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": tr.lr, "betas": [tr.beta1, tr.beta2], "eps": 1e-8},
        }
    return ds


def _worker_peer(cfg, variant: str, steps: int, warmup: int, experts_impl: str) -> dict:
    from sigma_moe.data.dataset import build_train_dataset
    from sigma_moe.data.tokenizer import load_tokenizer
    from sigma_moe.train.engine import init_distributed
    from sigma_moe.train.sampling import StaticSampler

    world = init_distributed() if variant != "hf" else None
    nproc = world.world_size if world else 1
    tok = load_tokenizer(cfg.data.tokenizer)
    G = cfg.train.global_batch_size
    ds = build_train_dataset(
        cfg.data.domains, cfg.data.seq_len, steps * G, cfg.train.seed, tok, reset_at_eod=False
    )
    sampler = StaticSampler(ds, G)
    torch.manual_seed(cfg.train.seed)
    model = _hf_model(cfg.build_model(tok.vocab_size), experts_impl)
    tr = cfg.train
    opt = None
    if variant != "autoep":
        opt = torch.optim.AdamW(
            model.parameters(), lr=tr.lr, betas=(tr.beta1, tr.beta2), eps=1e-8, fused=True
        )
    engine = None
    if variant != "hf":
        import deepspeed

        if variant == "autoep":
            _patch_transformers_for_autoep()
        engine, opt, _, _ = deepspeed.initialize(
            model=model,
            optimizer=opt,
            model_parameters=model.parameters() if opt is None else None,
            config=_ds_config(cfg, variant, nproc),
        )
    times, losses = train_peer(
        cfg, engine or model, opt, ds, sampler, steps, world.rank if world else 0, nproc
    )
    return {"step_times": times[warmup:], "losses": losses}


def train_peer(cfg, model, opt, ds, sampler, steps: int, rank: int = 0, nproc: int = 1):
    """The loop a transformers user writes: CE over the logits, backward, clip, fused AdamW
    (or a DeepSpeed engine's backward/step), our lr schedule; the batches of our sampler.
    Returns (seconds per step, loss per step: mean CE over this rank's last micro-batch)."""
    from sigma_moe.data.dataset import collate
    from sigma_moe.train.engine import lr_at

    G, mb, tr = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train
    is_engine = hasattr(model, "backward")
    params = [p for p in model.parameters() if p.requires_grad]
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg.train, step)
        keys = sampler.keys_for_step(step)
        for a in range(G // (mb * nproc)):
            j = a * nproc + rank
            b = collate([ds.get_domain_sample(*k) for k in keys[j * mb : (j + 1) * mb]])
            labels = masked_labels(b)
            logits = model(input_ids=b["input_ids"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            (model.backward if is_engine else torch.Tensor.backward)(loss)
        if is_engine:
            model.step()
        else:
            if tr.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tr.grad_clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t0)
    return times, losses


def hf_copy_of(model) -> torch.nn.Module:
    """A transformers Qwen3MoeForCausalLM holding exactly our model's weights (EP=1, top-1)."""
    from transformers import Qwen3MoeForCausalLM

    from sigma_moe.export.hf import qwen3_config, to_hf_state

    mcfg = model.config
    hf = Qwen3MoeForCausalLM(qwen3_config(mcfg, model.current_topk()[0], 0, torch.float32))
    state = to_hf_state({k: v.detach().clone() for k, v in model.state_dict().items()},
                        mcfg.num_layers)  # fmt: skip
    if mcfg.tie_embeddings:
        state.pop("lm_head.weight")
    hf.load_state_dict(state, strict=not mcfg.tie_embeddings)
    return hf.train()


def _worker(args) -> int:
    experts, nproc = args.experts[0], args.world or args.nproc[0]  # one of each per worker
    if args.worker == "ours-solo":  # one of `nproc` independent 1-process runs
        cfg = _recipe(experts, args.steps, args.quick, 1, solo_of=nproc)
    else:
        cfg = _recipe(experts, args.steps, args.quick, nproc if args.worker == "ours" else 1, nproc)
    if args.worker in ("ours", "ours-solo"):
        res = _worker_ours(cfg, Path(args.out).parent / "run", args.warmup)
    else:
        variant = "hf" if args.worker == "hf-ourenv" else args.worker
        res = _worker_peer(cfg, variant, args.steps, args.warmup, args.hf_experts)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["tokens_per_step"] = cfg.train.global_batch_size * cfg.data.seq_len
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.out}.rank{rank}").write_text(json.dumps(res))
    return 0


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _launch(variant: str, experts: int, nproc: int, args, timeout: float) -> dict:
    # each run's folder (its run dir holds a final checkpoint: ~0.8 GB at E=96) goes when its
    # results are read; left behind, a full `bench train` filled the disk (2026-12-01)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        return _launch_in(tmp / "res.json", variant, experts, nproc, args, timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _launch_in(out: Path, variant: str, experts: int, nproc: int, args, timeout: float) -> dict:
    tail = [
        # (--world, not --nproc: torchrun's own parser takes "--nproc" as an abbreviation)
        "--worker", variant, "--experts", str(experts), "--world", str(nproc),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out),
        "--hf-experts", args.hf_experts,
    ] + (["--quick"] if args.quick else [])  # fmt: skip
    if variant == "ours-solo":
        return _launch_solo(out, experts, nproc, tail, timeout)
    if nproc == 1:
        cmd = [sys.executable, "-m", "sigma_moe.bench.train", *tail]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "sigma_moe.bench.train", *tail]  # fmt: skip
    # here, not at the top: the parent of the bench workers never needs DeepSpeed imported (~4 s)
    from sigma_moe.train.engine import child_env

    env = child_env(TOKENIZERS_PARALLELISM="false")
    if variant not in ("ours", "hf-ourenv"):
        env = {k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"} | TORCH_DEFAULT_ENV
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    ranks = [json.loads(f.read_text()) for f in sorted(out.parent.glob("res.json.rank*"))]
    if p.returncode != 0 or not ranks:
        last = [ln for ln in (p.stderr or p.stdout).strip().splitlines() if ln.strip()]
        return {"error": (last[-1] if last else f"exit {p.returncode}")[:200]}
    r0 = ranks[0]
    dt = statistics.median(r0["step_times"])
    return {
        "tokens_per_s": r0["tokens_per_step"] / dt,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),  # per process
        "losses": r0["losses"],
    }


def _launch_solo(out: Path, experts: int, nproc: int, tail: list[str], timeout: float) -> dict:
    """ours-solo: `nproc` plain 1-process runs of ours at once, each with its own folder and the
    threads and wait policy input a rank of ours gets at EP=nproc (cores/nproc threads, this
    node's nproc ranks)."""
    from sigma_moe._threads import cores
    from sigma_moe.train.engine import child_env

    threads = str(max(1, cores() // nproc))
    env = child_env(
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=threads, LOCAL_WORLD_SIZE=str(nproc)
    )
    outs = [out.parent / f"solo{i}" / "res.json" for i in range(nproc)]
    procs = []
    for o in outs:
        o.parent.mkdir(parents=True)
        cmd = [sys.executable, "-m", "sigma_moe.bench.train",
               *[a if a != str(out) else str(o) for a in tail]]  # fmt: skip
        with open(o.parent / "stderr.txt", "w") as err:  # a file: a full pipe would stall a run
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env))
    deadline = time.monotonic() + timeout  # one deadline for all: they run at once
    errors = []
    for p, o in zip(procs, outs):
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            errors.append(f"timed out after {timeout:.0f} s")
            continue
        if p.returncode != 0:
            lines = (o.parent / "stderr.txt").read_text().strip().splitlines()
            errors.append((lines[-1] if lines else f"exit {p.returncode}")[:200])
    if errors:
        return {"error": errors[0]}
    res = [json.loads(Path(f"{o}.rank0").read_text()) for o in outs]
    dt = max(statistics.median(r["step_times"]) for r in res)  # the slowest run sets the pace
    return {
        "tokens_per_s": sum(r["tokens_per_step"] for r in res) / dt,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in res),
        "losses": res[0]["losses"],
    }


def _variants(nproc: int, args) -> list[str]:
    """The variants of one process count: all (or --variants) that run there."""
    valid = ["ours", *(PEERS if nproc == 1 else ("autoep", "ours-solo"))]
    want = ["ours"] if args.no_peers else (args.variants or valid)
    return [v for v in want if v in valid]


def run(args) -> dict:
    info = machine_info()
    rows = []
    for nproc in args.nproc:
        for experts in args.experts:
            variants = _variants(nproc, args)
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for _, v in rotated_rounds(variants, args.repeats):
                runs[v].append(_launch(v, experts, nproc, args, args.timeout))
            rows += _summarise(experts, nproc, runs)
    info["loadavg_end"] = os.getloadavg()[0]
    return {"machine": info, "settings": _settings(args), "rows": rows}


def _summarise(experts: int, nproc: int, runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for v, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        row = {"experts": experts, "nproc": nproc, "variant": v, "runs": len(ok)}
        if ok:
            tps = [r["tokens_per_s"] for r in ok]
            row.update(
                tokens_per_s=statistics.median(tps),
                tokens_per_s_all=[round(t) for t in tps],
                peak_rss_mib=statistics.median(r["peak_rss_mib"] for r in ok),
                first_loss=ok[0]["losses"][0],
                last_loss=ok[0]["losses"][-1],
            )
        if len(ok) < len(rs):
            row["error"] = next(r["error"] for r in rs if "error" in r)
        rows.append(row)
    peers = [
        r["tokens_per_s"]
        for r in rows
        if r["variant"] not in ("ours", "ours-solo") and "tokens_per_s" in r
    ]
    for r in rows:
        if peers and "tokens_per_s" in r:
            r["vs_best_peer"] = r["tokens_per_s"] / max(peers)
    return rows


def _settings(args) -> dict:
    return {k: getattr(args, k) for k in ("experts", "nproc", "steps", "warmup", "repeats",
                                          "quick", "hf_experts")}  # fmt: skip


COLUMNS = [
    ("experts", "E"),
    ("nproc", "procs"),
    ("variant", "variant"),
    ("tokens_per_s", "tokens/s (median)"),
    ("tokens_per_s_all", "per run"),
    ("vs_best_peer", "× best peer"),
    ("peak_rss_mib", "peak RSS MiB/proc"),
    ("first_loss", "loss step 1"),
    ("last_loss", "loss last step"),
    ("error", "error"),
]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sigma-moe bench train",
        description="End-to-end training tokens/s: ours vs transformers Qwen3-MoE (plain loop, "
        "DeepSpeed ZeRO-0/1, DeepSpeed AutoEP) on the same batches.",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--experts", type=int, nargs="+", default=[32, 96])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1], help="process counts (1 2)")
    ap.add_argument("--steps", type=int, default=12, help="steps per run (default 12)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed first steps (default 4)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant (default 2)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--hf-experts", default="grouped_mm", help="transformers experts impl.")
    ap.add_argument("--no-peers", action="store_true", help="only ours")
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=["ours", *PEERS, "ours-solo"],
        help="a subset (default: all)",
    )
    ap.add_argument("--quick", action="store_true", help="test-tiny sizes, 3 steps, 1 repeat")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.quick:
        args.steps, args.warmup, args.repeats = min(args.steps, 3), min(args.warmup, 1), 1
    if not 0 <= args.warmup < args.steps:
        raise SystemExit(f"--warmup {args.warmup} must be in [0, --steps {args.steps})")
    out = run(args)
    print(describe_machine(out["machine"]))
    m = out["machine"]
    print(f"load average (1 min): {m.get('loadavg_start')} at start, {m['loadavg_end']} at end")
    print(f"settings: {out['settings']}\n")
    print(markdown_table(out["rows"], COLUMNS))
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
