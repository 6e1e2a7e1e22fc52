"""`python -m sigma_moe.bench.gpu_check`: the first minutes on a Hopper GPU (run by scripts/gpu_check.sh).

Benchmarks every kernel and the whole MoE layer at the Sigma-MoE-Tiny layer shape (T=8192,
D=1536, F=768, E=96; top-1 and top-8; bf16; balanced and skewed routing) against
``torch._grouped_mm`` experts and a dense GEMM of the same FLOPs, and reports per kernel µs,
achieved GB/s (memory-bound kernels: the ideal bytes moved) or TFLOP/s (GEMMs) as a fraction of
the measured device copy bandwidth / dense bf16 GEMM rate, next to the issue's targets:
router and permute kernels >= 70% of copy bandwidth, grouped SwiGLU forward >= 60% and backward
>= 50% of the dense GEMM rate, the whole layer within 1.3x of the grouped_mm layer.  Writes one
JSON and one markdown file.

Needs only torch, triton and sigma_moe_kernels (the GPU image has no DeepSpeed / megatron).
``--dry-run`` runs the same code on CPU under Triton's interpreter at tiny shapes (T=64, D=32,
F=16, E=8) in seconds, so the script cannot rot (tests/kernels/test_gpu_check_dry_run.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import triton

import sigma_moe_kernels as K

from .common import markdown_table

gs_mod = importlib.import_module("sigma_moe_kernels.grouped_swiglu")
# the Triton implementation reads its grid order from this module global
gs_triton = importlib.import_module("sigma_moe_kernels.grouped_swiglu_triton")

TINY = dict(T=8192, D=1536, F=768, E=96)
DRY = dict(T=64, D=32, F=16, E=8)
TARGET_BW, TARGET_FWD, TARGET_BWD, TARGET_LAYER = 0.70, 0.60, 0.50, 1.3


# ----------------------------------------------------------------------------------------------
# timing and machine rates
# ----------------------------------------------------------------------------------------------
def _time_us(fn, device: torch.device, reps: int) -> float:
    """Median µs of `fn()` over `reps` runs after 3 warm-up runs (the first triggers the
    autotuner) on GPU (CUDA events); one cold run on CPU (the dry run checks the code path)."""
    for _ in range(3 if device.type == "cuda" else 0):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(out)


def copy_bandwidth(device, reps, numel) -> float:
    """Device copy rate in GB/s (read + write) of a `numel`-element bf16 buffer."""
    x = torch.empty(numel, dtype=torch.bfloat16, device=device).fill_(1)
    y = torch.empty_like(x)
    us = _time_us(lambda: y.copy_(x), device, reps)
    return 2 * x.numel() * 2 / us / 1e3


def gemm_rate(device, reps, n) -> float:
    """Dense bf16 GEMM rate in TFLOP/s at n x n x n."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    us = _time_us(lambda: a @ b, device, reps)
    return 2 * n**3 / us / 1e6


# ----------------------------------------------------------------------------------------------
# problem set-up
# ----------------------------------------------------------------------------------------------
def _routing(T, E, k, skewed: bool, device, gen):
    """Router logits: balanced (iid) or skewed (Zipf-like expert bias: the top expert gets
    ~10x the mean load at top-1)."""
    logits = torch.randn(T, E, generator=gen)
    if skewed:
        logits += 2.5 * torch.log(1.0 / torch.arange(1, E + 1).float())
    return logits.to(device)


def _weights(E, D, F, device, gen):
    mk = lambda *s: torch.randn(*s, generator=gen) / s[-2] ** 0.5  # noqa: E731
    ws = [mk(E, D, F), mk(E, D, F), mk(E, F, D)]
    return [w.to(device, torch.bfloat16).requires_grad_() for w in ws]


def _grouped_mm_experts(x, counts, wg, wu, wd):
    offs = torch.cumsum(counts, 0).to(torch.int32)
    hg = torch._grouped_mm(x, wg, offs=offs)
    hu = torch._grouped_mm(x, wu, offs=offs)
    return torch._grouped_mm(torch.nn.functional.silu(hg) * hu, wd, offs=offs)


def _layer(x, logits, ws, k, be, experts_fn=None):
    w, ex, counts, _ = K.topk_route(logits, k, backend=be)
    xs, rm = K.permute(x, ex, backend=be)
    if experts_fn is None:
        ys = K.grouped_swiglu(xs, counts, *ws, backend=be)
    else:
        ys = experts_fn(xs, counts, *ws)
    return K.unpermute(ys, rm, w.to(ys.dtype), backend=be)


def _fwd_bwd(f, inputs):
    def run():
        for t in inputs:
            t.grad = None
        y = f()
        y.backward(torch.ones_like(y))

    return run


# ----------------------------------------------------------------------------------------------
# one routing case: every kernel, the experts, the layer
# ----------------------------------------------------------------------------------------------
tr_mod = importlib.import_module("sigma_moe_kernels.topk_route")
pm_mod = importlib.import_module("sigma_moe_kernels.permute")


def _memory_ops(c: dict) -> dict:
    """name -> (fn, ideal bytes moved) for the router and permute kernels (custom ops direct)."""
    T, D, E, k, N, be = c["T"], c["D"], c["E"], c["k"], c["N"], c["be"]
    lg, ex, w, ys, rm, wts = c["logits"], c["ex"], c["w"], c["ys"], c["rm"], c["wts"]
    probs = tr_mod._topk_route_fwd_op(lg, k, False, be)[4]
    gw, gps, g_TD = c["gw"], c["gps"], c["g_TD"]
    return {  # bytes: fp32 probs / grads, bf16 activations (2 B), int64 ids
        "router fwd": (lambda: tr_mod._topk_route_fwd_op(lg, k, False, be), T * E * 8 + T * k * 12),
        "router bwd": (
            lambda: tr_mod._topk_route_bwd_op(gw, gps, probs, ex, w, False, be),
            T * E * 8 + T * k * 16,
        ),
        "permute fwd (gather)": (lambda: pm_mod._gather_rows_triton(c["x0"], c["src"]), 4 * N * D),
        "unpermute fwd (combine)": (
            lambda: pm_mod._combine_op(ys, rm, wts, T, k, be),
            2 * (N + T) * D,
        ),
        "permute bwd (combine)": (
            lambda: pm_mod._combine_op(ys, rm, None, T, k, be),
            2 * (N + T) * D,
        ),
        "unpermute bwd": (
            lambda: pm_mod._unpermute_bwd_op(g_TD, ys, rm, wts, be),
            2 * (T + 2 * N) * D,
        ),
    }


def _experts_rows(c: dict, reps: int, tflops: float) -> list[dict]:
    """Grouped SwiGLU fwd / bwd (and both grid orders) against dense GEMMs of the same FLOPs."""
    dev, be, N, D, F = c["device"], c["be"], c["N"], c["D"], c["F"]
    flops = 2 * N * D * F * 3
    xs, counts, ws = c["xs"], c["counts"], c["ws"]
    prec = "auto"  # bf16: the launcher resolves it (ignored for 16-bit dots)
    fwd = lambda: gs_mod._gs_fwd_op(xs, counts, *ws, None, be, prec)  # noqa: E731
    y, hg, hu = fwd()
    dy = torch.randn_like(y)
    bwd = lambda: gs_mod._gs_bwd_op(dy, xs, counts, *ws, hg, hu, None, be, prec)  # noqa: E731
    rows = []
    for name, fn, fl, target in (
        ("grouped SwiGLU fwd", fwd, flops, TARGET_FWD),
        ("grouped SwiGLU bwd", bwd, 2 * flops, TARGET_BWD),
    ):
        us = _time_us(fn, dev, reps)
        tf = fl / us / 1e6
        rows.append(_row(name, us, tflops=tf, frac=tf / tflops, target=target))
    gs_triton.N_FASTEST = False  # the other grid order, for comparison (issue 14, defect 6)
    try:
        us_m = _time_us(lambda: (fwd(), bwd()), dev, reps)
    finally:
        gs_triton.N_FASTEST = True
    us_n = _time_us(lambda: (fwd(), bwd()), dev, reps)
    rows.append(_row("grouped SwiGLU fwd+bwd, N-fastest grid", us_n))
    rows.append(_row("grouped SwiGLU fwd+bwd, M-fastest grid", us_m, ratio=us_m / us_n))
    # the forward's FLOPs as dense GEMMs: [N, D] x [D, F] twice and [N, F] x [F, D]
    bf = dict(device=dev, dtype=torch.bfloat16)
    a, b = torch.randn(N, D, **bf), torch.randn(D, F, **bf)
    h, e = torch.randn(N, F, **bf), torch.randn(F, D, **bf)
    us = _time_us(lambda: (a @ b, a @ b, h @ e), dev, reps)
    rows.append(_row("dense GEMMs, same FLOPs as fwd", us, tflops=flops / us / 1e6))
    return rows


def _case(shape, k, skewed, be, device, reps, bw, tflops):
    T, D, F, E = shape["T"], shape["D"], shape["F"], shape["E"]
    gen = torch.Generator().manual_seed(k * 2 + skewed)
    bf = dict(device=device, dtype=torch.bfloat16)
    logits = _routing(T, E, k, skewed, device, gen)
    x = torch.randn(T, D, generator=gen).to(**bf).requires_grad_()
    ws = _weights(E, D, F, device, gen)
    w, ex, counts, _ = K.topk_route(logits, k, backend=be)
    xs, rm = K.permute(x.detach(), ex, backend=be)
    c = dict(T=T, D=D, F=F, E=E, k=k, N=T * k, be=be, device=device, logits=logits, ex=ex, w=w)
    c.update(rm=rm, wts=w.to(torch.bfloat16), x0=x.detach(), counts=counts, ws=ws)
    c.update(xs=xs.detach().requires_grad_(), ys=torch.randn(T * k, D, generator=gen).to(**bf))
    c.update(gw=torch.randn(T, k, generator=gen).to(device), gps=torch.randn(E).to(device))
    c.update(g_TD=torch.randn(T, D, generator=gen).to(**bf))
    order = pm_mod._sort_order(ex)
    c.update(src=order if k == 1 else torch.div(order, k, rounding_mode="floor"))
    rows = []
    for name, (fn, nbytes) in _memory_ops(c).items():
        us = _time_us(fn, device, reps)
        gbs = nbytes / us / 1e3
        rows.append(_row(name, us, gbs=gbs, frac=gbs / bw, target=TARGET_BW))
    # the whole permute forward: torch's stable argsort of the N expert ids + the gather
    us = _time_us(lambda: pm_mod._permute_fwd_op(x.detach(), ex, be), device, reps)
    rows.append(_row("permute fwd (argsort + gather)", us, gbs=4 * T * k * D / us / 1e3))
    rows += _experts_rows(c, reps, tflops)
    inputs = [x, *ws]
    ours = _fwd_bwd(lambda: _layer(x, logits, ws, k, be), inputs)
    gmm = _fwd_bwd(lambda: _layer(x, logits, ws, k, be, _grouped_mm_experts), inputs)
    us_gmm = _time_us(gmm, device, reps)
    us_ours = _time_us(ours, device, reps)
    rows.append(_row("layer fwd+bwd, torch._grouped_mm experts", us_gmm))
    ratio = us_ours / us_gmm
    rows.append(_row("layer fwd+bwd, ours", us_ours, ratio=ratio, target=TARGET_LAYER, low=True))
    load = counts.float()
    imbalance = round(load.max().item() / load.mean().item(), 2)
    for r in rows:
        r.update(k=k, routing="skewed" if skewed else "balanced", max_load=imbalance)
    return rows


def _row(name, us, gbs=None, tflops=None, frac=None, ratio=None, target=None, low=False):
    met = None
    if target is not None:
        v = ratio if ratio is not None else frac
        met = bool(v <= target) if low else bool(v >= target)
    sig = lambda v: None if v is None else float(f"{v:.4g}")  # noqa: E731 - 4 significant digits
    return dict(
        op=name,
        us=sig(us),
        gb_s=sig(gbs),
        tflop_s=sig(tflops),
        frac_of_peak=sig(frac),
        ratio=sig(ratio),
        target=target,
        met=met,
    )


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def run(dry_run: bool, reps: int) -> dict:
    if dry_run:
        device, be, shape = torch.device("cpu"), "interpret", DRY
        bw, tf = copy_bandwidth(device, 3, 1 << 20), gemm_rate(device, 3, 256)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check needs a CUDA device (or --dry-run on CPU)")
        device, be, shape = torch.device("cuda"), "triton", TINY
        bw, tf = copy_bandwidth(device, reps, 1 << 29), gemm_rate(device, reps, 8192)
    rows = []
    # every (k, routing) case on GPU; two in the dry run (E=8 experts there)
    cases = [(1, False), (2, True)] if dry_run else [(1, False), (1, True), (8, False), (8, True)]
    for k, skewed in cases:
        rows += _case(shape, k, skewed, be, device, reps, bw, tf)
    return {
        # not common.machine_info(): it imports deepspeed (~25 s here), absent on the GPU image
        "machine": {
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
        "backend": be,
        "shape": shape,
        "copy_gb_s": round(bw, 1),
        "dense_bf16_tflop_s": round(tf, 1),
        "rows": rows,
    }


def markdown(rep: dict) -> str:
    cols = [("k", "k"), ("routing", "routing"), ("max_load", "max/mean load"), ("op", "op")]
    cols += [("us", "µs"), ("gb_s", "GB/s"), ("tflop_s", "TFLOP/s")]
    cols += [("frac_of_peak", "of peak"), ("ratio", "ratio"), ("target", "target"), ("met", "met")]
    head = (
        f"gpu_check on {rep['device']} (torch {torch.__version__}, Triton {rep['triton']}, "
        f"backend {rep['backend']}), shape {rep['shape']}: measured copy "
        f"{rep['copy_gb_s']} GB/s, dense bf16 GEMM {rep['dense_bf16_tflop_s']} TFLOP/s.\n"
        "'of peak' is GB/s over the copy rate (memory-bound ops) or TFLOP/s over the GEMM rate; "
        "'ratio' is ours / torch._grouped_mm for the layer, M-fastest / N-fastest for the grid.\n\n"
    )
    return head + markdown_table(rep["rows"], cols) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sigma_moe.bench.gpu_check", description=__doc__)
    ap.add_argument("--dry-run", action="store_true", help="CPU + interpreter, tiny shapes")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="gpu_check", help="folder for gpu_check.json / .md")
    a = ap.parse_args(argv)
    rep = run(a.dry_run, 1 if a.dry_run else a.reps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(rep, indent=1))
    (out / "gpu_check.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
