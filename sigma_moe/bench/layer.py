"""`sigma-moe bench layer`: the whole MoE layer, forward+backward, against the alternatives.

Rows, side by side in one run (interleaved rounds, medians):
* dense SwiGLU FFN with the same active parameters (hidden k*F)      -- the yardstick;
* ours: fp32 router Linear + topk_route + permute + grouped_swiglu + unpermute (torch backend
  on CPU, triton on CUDA), built here from the kernels (not the model's layer);
* DeepSpeed ``deepspeed.moe.layer.MoE`` with the same SwiGLU experts, capacity factor 1.0 (the
  tokens it drops are reported), in a one-process gloo group;
* transformers' ``Qwen3MoeSparseMoeBlock`` with the same sizes, with its "eager" experts loop and
  with its ``grouped_mm`` experts implementation.

Each row: median/min ms, ratio to dense, achieved FLOP/s (useful FLOPs: experts + router) as a
fraction of the dense-GEMM rate measured in the same run, and the peak memory of one fwd+bwd
(activations + temporaries, excluding parameters and gradients) with its ratio to dense.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import sigma_moe_kernels as K

from .common import (
    describe_machine,
    gemm_flops,
    machine_info,
    markdown_table,
    peak_memory_bytes,
    time_side_by_side,
    write_json,
)


# ----------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------
class SwiGLUFFN(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)
        for lin in (self.gate, self.up, self.down):
            nn.init.normal_(lin.weight, std=0.02)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class KernelMoE(nn.Module):
    """The MoE layer as the kernels compose it (fp32 router, top-k softmax gate, no renorm).

    ``skew`` > 0: the first ``skew`` of the tokens are routed to expert 0 (their router logit
    for it raised by 30), the imbalance of early training."""

    def __init__(self, d: int, f: int, e: int, k: int, backend: str = "auto", skew: float = 0.0):
        super().__init__()
        self.k, self.e, self.backend, self.skew = k, e, backend, skew
        self.router = nn.Linear(d, e, bias=False)
        self.w_gate = nn.Parameter(torch.randn(e, d, f) * 0.02)
        self.w_up = nn.Parameter(torch.randn(e, d, f) * 0.02)
        self.w_down = nn.Parameter(torch.randn(e, f, d) * 0.02)
        nn.init.normal_(self.router.weight, std=0.02)

    def forward(self, x_TD):
        be = self.backend
        logits = self.router(x_TD.float())
        if self.skew > 0:
            bias = torch.zeros_like(logits)
            bias[: int(self.skew * x_TD.shape[0]), 0] = 30.0
            logits = logits + bias
        w, experts, counts, prob_sum = K.topk_route(logits, self.k, backend=be)
        ws = (self.w_gate, self.w_up, self.w_down)
        y_sorted, row_map = K.routed_experts(x_TD, experts, counts, *ws, backend=be)
        y = K.unpermute(y_sorted, row_map, w, backend=be)
        T = x_TD.shape[0]
        # load-balancing loss N_E * sum_i f_i p_i
        aux = self.e * (counts.float() / max(T * self.k, 1) * prob_sum / max(T, 1)).sum()
        return y, aux


def _init_gloo() -> None:
    import deepspeed.comm as ds_dist

    if ds_dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    ).items():
        os.environ.setdefault(k, v)
    import deepspeed

    # deepspeed.comm keeps its own handle: initialise through it (gloo, this one process)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


class DeepSpeedMoE(nn.Module):
    def __init__(self, d: int, f: int, e: int, k: int, capacity_factor: float = 1.0):
        super().__init__()
        _init_gloo()
        from deepspeed.moe.layer import MoE

        self.k, self.e, self.cf = k, e, capacity_factor
        self.moe = MoE(
            hidden_size=d,
            expert=SwiGLUFFN(d, f),
            num_experts=e,
            ep_size=1,
            k=k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            min_capacity=0,
            drop_tokens=True,
        )
        self.moe.set_deepspeed_parallelism()
        self.last_dropped = 0

    def forward(self, x_TD):
        out, l_aux, exp_counts = self.moe(x_TD)
        T = x_TD.shape[0]
        cap = math.ceil(T / self.e * self.cf * self.k)
        self.last_dropped = int(torch.clamp(exp_counts - cap, min=0).sum())
        return out, l_aux


class HFQwen3MoE(nn.Module):
    def __init__(self, d: int, f: int, e: int, k: int, impl: str = "eager"):
        super().__init__()
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(
            hidden_size=d,
            moe_intermediate_size=f,
            num_experts=e,
            num_experts_per_tok=k,
            norm_topk_prob=False,
        )
        cfg._experts_implementation = impl
        self.block = Qwen3MoeSparseMoeBlock(cfg)
        for p in self.block.parameters():
            nn.init.normal_(p, std=0.02)

    def forward(self, x_TD):
        return self.block(x_TD.unsqueeze(0)).squeeze(0)


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------
def _step(layer, x, g):
    # like a training step after zero_grad(set_to_none=True): gradients are stolen, not
    # accumulated (accumulating 3 x 48 MB of expert grads would cost ~18 ms of add_ per step)
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    out = layer(x)
    if isinstance(out, tuple):
        y, aux = out
        torch.autograd.backward([y, aux], [g, torch.ones_like(aux)])
    else:
        out.backward(g)


def _case(T, D, F_, E, k, dev, reps, peak, with_peers=True, skew=0.25) -> list[dict]:
    torch.manual_seed(0)
    ours = f"ours ({'triton' if dev.type == 'cuda' else 'torch'} backend)"
    layers: dict[str, nn.Module] = {
        f"dense SwiGLU FFN (hidden {k * F_})": SwiGLUFFN(D, k * F_),
        ours: KernelMoE(D, F_, E, k),
    }
    skewed = f"{ours}, expert 0 holds {skew:.0%} of tokens" if skew > 0 else None
    if skewed:  # the same weights, one expert holding `skew` of the tokens
        layers[skewed] = KernelMoE(D, F_, E, k, skew=skew)
        layers[skewed].load_state_dict(layers[ours].state_dict())
    notes: dict[str, str] = {}
    if with_peers:
        try:
            layers["DeepSpeed MoE (capacity 1.0)"] = DeepSpeedMoE(D, F_, E, k)
        except Exception as exc:  # noqa: BLE001 - report, don't die, when a peer can't run
            notes["DeepSpeed MoE"] = f"unavailable: {exc!r}"[:200]
        for impl in ("eager", "grouped_mm"):
            try:
                m = HFQwen3MoE(D, F_, E, k, impl)
                m.to(dev)(torch.randn(8, D, device=dev))  # probe
                layers[f"transformers Qwen3MoeSparseMoeBlock ({impl})"] = m
            except Exception as exc:  # noqa: BLE001
                notes[f"transformers ({impl})"] = f"unavailable: {exc!r}"[:200]
    for m in layers.values():
        m.to(dev)
    x = torch.randn(T, D, device=dev, requires_grad=True)
    g = torch.randn(T, D, device=dev)
    fns = {n: (lambda m=m: _step(m, x, g)) for n, m in layers.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = time_side_by_side(fns, reps, 1, dev)
        mem = {
            n: peak_memory_bytes(lambda m=m: _step(m, x, g), [x, *m.parameters()], dev)
            for n, m in layers.items()
        }
    expert_flops = 18.0 * T * k * D * F_
    router_flops = 6.0 * T * D * E
    dense_name = next(iter(layers))
    rows = []
    for n, r in res.items():
        flops = expert_flops + (0.0 if n == dense_name else router_flops)
        rate = flops / (r["median_ms"] * 1e-3)
        row = {
            "case": f"T={T} D={D} F={F_} E={E} top-{k}",
            "layer": n,
            "median_ms": r["median_ms"],
            "min_ms": r["min_ms"],
            "times_ms": [round(t, 2) for t in r["times_ms"]],  # per round: outliers show
            "x_dense_time": r["median_ms"] / res[dense_name]["median_ms"],
            "x_balanced_time": r["median_ms"] / res[ours]["median_ms"] if n == skewed else None,
            "gflops": rate / 1e9,
            "frac_of_gemm": rate / peak,
            "peak_mb": mem[n] / 2**20,
            "x_dense_mem": mem[n] / max(mem[dense_name], 1),
            "dropped": 0,
        }
        if isinstance(layers[n], DeepSpeedMoE):
            row["dropped"] = layers[n].last_dropped
            row["dropped_frac"] = layers[n].last_dropped / (T * k)
        rows.append(row)
    for n, msg in notes.items():
        rows.append({"case": f"T={T} top-{k}", "layer": f"{n}: {msg}"})
    return rows


COLUMNS = [
    ("case", "case"),
    ("layer", "layer (fwd+bwd)"),
    ("median_ms", "median ms"),
    ("min_ms", "min ms"),
    ("x_dense_time", "time / dense"),
    ("x_balanced_time", "time / ours balanced"),
    ("gflops", "useful GFLOP/s"),
    ("frac_of_gemm", "fraction of dense GEMM rate"),
    ("peak_mb", "peak act+temp MB"),
    ("x_dense_mem", "mem / dense"),
    ("dropped", "tokens dropped"),
]


def run(quick=False, repeats=None, device=None, topk=(1, 8), peers=True, skew=0.25) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    T, D, F_, E = (1024, 256, 128, 96) if quick else (4096, 512, 256, 96)
    reps = repeats or (3 if quick else 7)
    info = machine_info()
    peak = gemm_flops(dev, m=T, k=D, n=D)
    rows = []
    for k in topk:
        rows += _case(T, D, F_, E, k, dev, reps if k == 1 else max(3, reps // 2), peak, peers, skew)
    info["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"machine": info, "gemm_flops_per_s": peak, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="sigma-moe bench layer",
        description="MoE layer fwd+bwd vs dense FFN, DeepSpeed MoE and transformers Qwen3-MoE.",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument(
        "--topk", type=int, nargs="+", default=[1, 8], help="top-k cases to run (default 1 8)"
    )
    ap.add_argument("--no-peers", action="store_true", help="skip DeepSpeed and transformers")
    ap.add_argument(
        "--skew",
        type=float,
        default=0.25,
        help="also ours with expert 0 holding this share of the tokens (0: skip; default 0.25)",
    )
    args = ap.parse_args(argv)
    if not 0 <= args.skew < 1:
        ap.error(f"--skew must be in [0, 1), got {args.skew}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(args.quick, args.repeats, args.device, tuple(args.topk), not args.no_peers, args.skew)
    print(describe_machine(out["machine"]))
    print(f"dense GEMM rate measured in this run: {out['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s\n")
    print(markdown_table(out["rows"], COLUMNS))
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
