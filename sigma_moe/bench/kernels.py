"""`sigma-moe bench kernels`: each op's backends against its torch reference, side by side.

Per op, forward+backward at the Sigma-MoE-Tiny layer ratios (T=4096 tokens, D=512, F=256,
E=96; top-1 and top-8 for the routing ops).  CPU: the torch backend vs the reference, plus the
alternatives measured when choosing the grouped-SwiGLU design.  CUDA: the triton backend too.
The interpreter backend is for correctness only (minutes per call at these sizes): not timed.
"""

from __future__ import annotations

import argparse
import importlib

import torch

import sigma_moe_kernels as K

from .common import (
    describe_machine,
    gemm_flops,
    machine_info,
    markdown_table,
    time_side_by_side,
    write_json,
)
from .swiglu_loop import bwd_torch_loop, fwd_torch_loop

# the torch implementation's module (the ranged bmm with its tuning knobs)
gs_mod = importlib.import_module("sigma_moe_kernels.grouped_swiglu_torch")


class _AltGroupedSwiGLU(torch.autograd.Function):
    """Runs an alternative (fwd, bwd) pair of grouped-SwiGLU implementations under autograd."""

    @staticmethod
    def forward(ctx, x, counts, wg, wu, wd, fwd, bwd):
        y, hg, hu = fwd(x, counts, wg, wu, wd)
        ctx.save_for_backward(x, counts, wg, wu, wd, hg, hu)
        ctx.bwd = bwd
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, dwg, dwu, dwd = ctx.bwd(dy.contiguous(), *ctx.saved_tensors)
        return dx, None, dwg, dwu, dwd, None, None


def _ranged(alpha, max_rows):
    def fwd(*a):
        return gs_mod._fwd_torch(*a, alpha=alpha, max_rows=max_rows)

    def bwd(*a):
        return gs_mod._bwd_torch(*a, alpha=alpha, max_rows=max_rows)

    return fwd, bwd


def _grouped_mm_swiglu(x, counts, wg, wu, wd):
    offs = torch.cumsum(counts, 0).to(torch.int32)
    hg = torch._grouped_mm(x, wg, offs=offs)
    hu = torch._grouped_mm(x, wu, offs=offs)
    return torch._grouped_mm(torch.nn.functional.silu(hg) * hu, wd, offs=offs)


def _swiglu_flops(N, D, F):
    return 18.0 * N * D * F  # 3 GEMMs forward (2*N*D*F each), twice that backward


def run(quick: bool = False, repeats: int | None = None, device: str | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    T, D, F, E = (1024, 256, 128, 96) if quick else (4096, 512, 256, 96)
    reps = repeats or (3 if quick else 7)
    info = machine_info()
    peak = gemm_flops(dev, m=T, k=D, n=D)
    # one generator drawn in this order (routing, permute, grouped SwiGLU): same inputs as before
    gen = torch.Generator().manual_seed(0)
    backends = ["torch"] + (["triton"] if dev.type == "cuda" else [])
    rows: list[dict] = []
    rows += _bench_topk_route(T, E, gen, dev, backends, reps, peak)
    rows += _bench_permute(T, D, E, gen, dev, backends, reps, peak)
    rows += _bench_grouped_swiglu(T, D, F, E, gen, dev, backends, reps, peak)
    # dense yardstick: same FLOPs as one GEMM-chain of the same rows
    return {"machine": info, "gemm_flops_per_s": peak, "shape": dict(T=T, D=D, F=F, E=E),
            "rows": rows}  # fmt: skip


def _bench_topk_route(T, E, gen, dev, backends, reps, peak) -> list[dict]:
    rows: list[dict] = []
    for k in (1, 8):
        logits = torch.randn(T, E, generator=gen).to(dev).requires_grad_()
        gw = torch.randn(T, k, generator=gen).to(dev)

        def route(fn, logits=logits, gw=gw, k=k):
            w, _, _, ps = fn(logits, k)
            ((w * gw).sum() + ps.sum()).backward()

        fns = {"reference": lambda route=route: route(K.reference.topk_route)}
        for be in backends:
            fns[be] = lambda route=route, be=be: route(
                lambda lg, kk: K.topk_route(lg, kk, backend=be)
            )
        res = time_side_by_side(fns, reps, 2, dev)
        rows += _rows("topk_route", f"T={T} E={E} k={k}", res, None, peak)
    return rows


def _bench_permute(T, D, E, gen, dev, backends, reps, peak) -> list[dict]:
    rows: list[dict] = []
    for k in (1, 8):
        x = torch.randn(T, D, generator=gen).to(dev).requires_grad_()
        experts = torch.rand(T, E, generator=gen).argsort(-1)[:, :k].to(dev)
        w = torch.rand(T, k, generator=gen).to(dev).requires_grad_()
        g = torch.randn(T, D, generator=gen).to(dev)

        def perm(p, u, x=x, experts=experts, w=w, g=g):
            xs, rm = p(x, experts)
            u(xs, rm, w).backward(g)

        fns = {"reference": lambda perm=perm: perm(K.reference.permute, K.reference.unpermute)}
        for be in backends:
            fns[be] = lambda perm=perm, be=be: perm(
                lambda a, b: K.permute(a, b, backend=be),
                lambda a, b, c: K.unpermute(a, b, c, backend=be),
            )
        res = time_side_by_side(fns, reps, 2, dev)
        rows += _rows("permute+unpermute", f"T={T} D={D} k={k}", res, None, peak)
    return rows


# the alternatives measured when choosing the grouped-SwiGLU design (CPU only)
_SWIGLU_ALTS = {
    "alt: per-expert torch.mm loop, manual bwd": (fwd_torch_loop, bwd_torch_loop),
    "alt: one padded bmm (single range)": _ranged(10**9, 10**9),
    "alt: ranged bmm, ranges <= 512 rows": _ranged(None, 512),
    "alt: ranged bmm, ranges <= 8192 rows": _ranged(None, 8192),
    "alt: ranged bmm, alpha=16": _ranged(16, None),
    "alt: ranged bmm, alpha=48 (before 2026-12-01)": _ranged(48, 512),
}


def _bench_grouped_swiglu(T, D, F, E, gen, dev, backends, reps, peak) -> list[dict]:
    N = T
    counts = torch.bincount(torch.randint(0, E, (N,), generator=gen), minlength=E).to(dev)
    x = torch.randn(N, D, generator=gen).to(dev).requires_grad_()
    ws = [
        (torch.randn(*s, generator=gen) * 0.02).to(dev).requires_grad_()
        for s in ((E, D, F), (E, D, F), (E, F, D))
    ]
    g = torch.randn(N, D, generator=gen).to(dev)

    def gsw(fn):
        fn(x, counts, *ws).backward(g)

    fns = {"reference": lambda: gsw(K.reference.grouped_swiglu)}
    for be in backends:
        fns[be] = lambda be=be: gsw(lambda *a: K.grouped_swiglu(*a, backend=be))
    if dev.type == "cpu":
        if "torch" in backends:  # the torch backend as it was before csrc/grouped_gemm.c

            def on_mkl():
                was, gs_mod._USE_CGEMM = gs_mod._USE_CGEMM, False
                try:
                    gsw(lambda *a: K.grouped_swiglu(*a, backend="torch"))
                finally:
                    gs_mod._USE_CGEMM = was

            fns["alt: torch backend on MKL's batch GEMM (C GEMMs off)"] = on_mkl
        for name, (f, b) in _SWIGLU_ALTS.items():
            fns[name] = lambda f=f, b=b: gsw(lambda *a, f=f, b=b: _AltGroupedSwiGLU.apply(*a, f, b))
        try:
            _grouped_mm_swiglu(x.detach(), counts, *(w.detach() for w in ws))
            fns["alt: torch._grouped_mm + autograd"] = lambda: gsw(_grouped_mm_swiglu)
        except (RuntimeError, NotImplementedError):
            pass
    res = time_side_by_side(fns, reps, 1, dev)
    return _rows("grouped_swiglu", f"N={N} D={D} F={F} E={E}", res, _swiglu_flops(N, D, F), peak)


def _rows(op, case, res, flops, peak):
    ref = res["reference"]["median_ms"]
    out = []
    for name, r in res.items():
        row = {
            "op": op,
            "case": case,
            "impl": name,
            "median_ms": r["median_ms"],
            "min_ms": r["min_ms"],
            "speedup_vs_ref": ref / r["median_ms"],
        }
        if flops:
            rate = flops / (r["median_ms"] * 1e-3)
            row["gflops"] = rate / 1e9
            row["frac_of_gemm"] = rate / peak
        out.append(row)
    return out


COLUMNS = [
    ("op", "op"),
    ("case", "case"),
    ("impl", "implementation"),
    ("median_ms", "median ms"),
    ("min_ms", "min ms"),
    ("speedup_vs_ref", "x vs reference"),
    ("gflops", "GFLOP/s"),
    ("frac_of_gemm", "fraction of dense GEMM"),
]


# ----------------------------------------------------------------------------------------------
# CUDA targets: minimal bytes moved and FLOPs per op, and the H100 roofline they imply
# ----------------------------------------------------------------------------------------------
H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM5 HBM3
H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM5 bf16 tensor cores, dense


def cuda_targets(T=8192, D=1536, F=768, E=96, k=1, act_bytes=2, w_bytes=2) -> list[dict]:
    """Ideal single-pass traffic per op at Sigma-MoE-Tiny layer sizes (bf16 activations and
    weights, fp32 router logits/probabilities, int64 indices), fwd and bwd separately."""
    N = T * k
    idx = 8
    ops = {
        # logits read, probs saved, weights/experts written
        "topk_route fwd": (4 * T * E + 4 * T * E + (4 + idx) * T * k, 6.0 * T * E),
        "topk_route bwd": (4 * T * E + 4 * T * E + (4 + 4 + idx) * T * k, 6.0 * T * E),
        "permute fwd (gather)": (act_bytes * (T * D + N * D) + 2 * idx * N, 0.0),
        "permute bwd (k-way sum)": (act_bytes * (N * D + T * D) + idx * N, float(N * D)),
        "unpermute fwd (weighted k-way sum)": (
            act_bytes * (N * D + T * D) + (idx + 4) * N,
            2.0 * N * D,
        ),
        "unpermute bwd (scatter + row dots)": (
            act_bytes * (T * D + 2 * N * D) + (idx + 8) * N,
            3.0 * N * D,
        ),
        # weights once, x in, h_gate/h_up/a out, a in, y out
        "grouped_swiglu fwd": (
            w_bytes * 3 * E * D * F + act_bytes * (2 * N * D + 4 * N * F),
            6.0 * N * D * F,
        ),
        # weights read, weight grads written, x/dy/hg/hu read, dx written, dhg/dhu/a round trip
        "grouped_swiglu bwd": (
            2 * w_bytes * 3 * E * D * F + act_bytes * (3 * N * D + 2 * N * F + 6 * N * F),
            12.0 * N * D * F,
        ),
    }
    rows = []
    for name, (nbytes, flops) in ops.items():
        t_bw = nbytes / H100_HBM_BYTES_PER_S
        t_fl = flops / H100_BF16_DENSE_FLOPS
        t = max(t_bw, t_fl)
        rows.append(
            {
                "op": name,
                "mbytes": nbytes / 1e6,
                "gflop": flops / 1e9,
                "intensity": flops / nbytes,
                "bound": "HBM" if t_bw >= t_fl else "tensor",
                "roofline_us": t * 1e6,
                "target_us": 2 * t * 1e6,
                "bw_frac_at_target": t_bw / (2 * t),
                "flop_frac_at_target": t_fl / (2 * t),
            }
        )
    return rows


CUDA_COLUMNS = [
    ("op", "op"),
    ("mbytes", "MB moved"),
    ("gflop", "GFLOP"),
    ("intensity", "FLOP/byte"),
    ("bound", "bound by"),
    ("roofline_us", "H100 roofline us"),
    ("target_us", "first-run target us (50% of roofline)"),
    ("bw_frac_at_target", "HBM fraction at target"),
    ("flop_frac_at_target", "tensor-rate fraction at target"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="sigma-moe bench kernels", description="Benchmark each kernel op vs its reference."
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(args.quick, args.repeats, args.device)
    print(describe_machine(out["machine"]))
    print(f"dense GEMM rate measured in this run: {out['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s\n")
    print(markdown_table(out["rows"], COLUMNS))
    targets = cuda_targets()
    out["cuda_targets"] = {"shape": "T=8192 D=1536 F=768 E=96 top-1, bf16", "rows": targets}
    print(
        "\nCUDA targets (Sigma-MoE-Tiny layer, T=8192 tokens/GPU, D=1536, F=768, E=96, top-1, "
        "bf16; H100 SXM 3.35 TB/s, 989 TFLOP/s):\n"
    )
    print(markdown_table(targets, CUDA_COLUMNS))
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
