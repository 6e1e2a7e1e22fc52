"""`sigma-moe bench step`: one training step (forward, backward, clipping, fused AdamW) of our
model against transformers' Qwen3-MoE of the same size, IN ONE PROCESS, variants stepping in
turn on the same real batches, so a busy machine slows every variant alike.

Variants (`--variants`, comma-separated):
  ours           SigmaMoEForCausalLM as `sigma-moe train` runs it (eager)
  ours-compile   the same under torch.compile (`train.compile: true`)
  ours-chunked-ce  ours with the LM head + CE forced into 512-row chunks (at demo sizes the
                 default is unchunked: K.linear_cross_entropy chunks only big logits)
  ours-mkl       ours with the experts' AVX-512 C GEMMs off (``_cgemm``; MKL's batch GEMM,
                 the path before them): the A/B of that kernel in whole training steps
  hf             transformers' Qwen3MoeForCausalLM, its grouped_mm experts (the fastest)
  hf-eager       the same with its per-expert loop ("eager" experts implementation)

Every model starts from its own initialisation and trains on the bundled corpus's first
batches of the demo-cpu recipe (the routing imbalance of early training is part of the cost:
expert load max/mean reaches 15-80 in the first steps at E=96). `sigma-moe bench train`
measures whole `sigma-moe train` runs in fresh processes instead (startup, data, logging);
this one isolates the step and is stable enough to compare kernels on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

import sigma_moe_kernels as K
import sigma_moe_kernels.grouped_swiglu_torch as gst
from sigma_moe.bench.common import describe_machine, machine_info, markdown_table, write_json
from sigma_moe.config import load_config
from sigma_moe.data.batch import masked_labels
from sigma_moe.data.dataset import build_train_dataset, collate
from sigma_moe.data.tokenizer import load_tokenizer
from sigma_moe.export.hf import qwen3_config
from sigma_moe.model import SigmaMoEForCausalLM
from sigma_moe.train.sampling import StaticSampler

VARIANTS = ("ours", "ours-compile", "ours-chunked-ce", "ours-mkl", "hf", "hf-eager")


def _batches(experts: int, n: int) -> tuple[list[dict], object]:
    recipe = Path(str(resources.files("sigma_moe") / "configs" / "demo-cpu.yaml"))
    cfg = load_config(recipe, [f"model.num_experts={experts}", "model.topk_schedule=[]"])
    tok = load_tokenizer(cfg.data.tokenizer)
    G = cfg.train.global_batch_size
    ds = build_train_dataset(cfg.data.domains, cfg.data.seq_len, n * G, cfg.train.seed, tok)
    sampler = StaticSampler(ds, G)
    out = []
    for step in range(n):
        b = collate([ds.get_domain_sample(*k) for k in sampler.keys_for_step(step)])
        out.append({"input_ids": b["input_ids"], "labels": masked_labels(b)})
    return out, cfg.build_model(tok.vocab_size)


class _Variant:
    def __init__(self, name: str, mcfg, lr: float):
        self.name, self.times, self.losses = name, [], []
        torch.manual_seed(0)
        if name.startswith("hf"):
            from transformers import Qwen3MoeForCausalLM  # optional peer, only when asked

            model = Qwen3MoeForCausalLM(qwen3_config(mcfg, 1, 0, torch.float32))
            model.set_experts_implementation("eager" if name == "hf-eager" else "grouped_mm")
        else:
            model = SigmaMoEForCausalLM(mcfg)
        self.model = model.train()
        self.fwd = torch.compile(model) if name == "ours-compile" else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    def _loss(self, b: dict) -> torch.Tensor:
        if self.name.startswith("hf"):
            logits = self.fwd(input_ids=b["input_ids"]).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten())
        out = self.fwd(b["input_ids"], labels=b["labels"], return_logits=False)
        valid = (b["labels"] != -100).sum().clamp_min(1)
        return out.loss_per_token.sum() / valid + sum(out.aux_losses.values())

    def step(self, b: dict, timed: bool) -> None:
        ce, cgemm = K.linear_cross_entropy, gst._USE_CGEMM
        if self.name == "ours-chunked-ce":  # swapped for this variant's step only
            K.linear_cross_entropy = lambda h, w, y: ce(h, w, y, chunk=512)
        if self.name == "ours-mkl":
            gst._USE_CGEMM = False
        try:
            t0 = time.perf_counter()
            loss = self._loss(b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
        finally:
            K.linear_cross_entropy, gst._USE_CGEMM = ce, cgemm
        self.losses.append(float(loss.detach()))
        if timed:
            self.times.append(dt)


def profile_table(v: _Variant, batches: list[dict], rows: int = 15) -> str:
    """torch.profiler over 3 more steps of one variant: the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile  # only with --profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[:3]:
            v.step(b, timed=False)
    return prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50
    )


def run(variants: list[str], experts: int, steps: int, warmup: int, prof: str | None = None):
    batches, mcfg = _batches(experts, warmup + steps)
    vs = [_Variant(n, mcfg, lr=2e-3) for n in variants]
    for i, b in enumerate(batches):
        order = vs if i % 2 == 0 else vs[::-1]
        for v in order:
            v.step(b, timed=i >= warmup)
    tokens = batches[0]["input_ids"].numel()
    base = statistics.median(vs[0].times)
    rows = []
    for v in vs:
        med = statistics.median(v.times)
        rows.append(
            {
                "variant": v.name,
                "median_ms": round(med * 1000, 1),
                "min_ms": round(min(v.times) * 1000, 1),
                "tokens_per_s": round(tokens / med),
                "speed_vs_first": round(base / med, 3),
                "loss_first_last": f"{v.losses[0]:.3f} -> {v.losses[-1]:.3f}",
            }
        )
    res = {"experts": experts, "steps": steps, "warmup": warmup, "rows": rows}
    for v in vs:
        if v.name == prof:
            res["profile"] = profile_table(v, batches[warmup:])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sigma-moe bench step", description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="hf,ours,ours-compile,ours-chunked-ce")
    ap.add_argument("--experts", type=int, default=96)
    ap.add_argument("--steps", type=int, default=16, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=4, help="untimed first steps (compile)")
    ap.add_argument("--profile", metavar="VARIANT", help="then profile 3 steps of VARIANT")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        ap.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.profile is not None and args.profile not in variants:
        ap.error(f"--profile {args.profile!r} is not one of --variants {variants}")
    if args.steps < 1 or args.warmup < 0:
        ap.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    info = machine_info()
    res = run(variants, args.experts, args.steps, args.warmup, args.profile)
    cols = [
        ("variant", "variant"),
        ("median_ms", "step ms (median)"),
        ("min_ms", "min"),
        ("tokens_per_s", "tokens/s"),
        ("speed_vs_first", f"speed vs {variants[0]}"),
        ("loss_first_last", "loss first -> last"),
    ]
    print(describe_machine(info))
    print(f"E={args.experts}, {args.steps} timed steps after {args.warmup}, one process:")
    print(markdown_table(res["rows"], cols))
    if "profile" in res:
        print(f"\nprofile of {args.profile} (3 steps, self CPU time):\n{res['profile']}")
    write_json(args.json, {"machine": info, **res})
    return 0
