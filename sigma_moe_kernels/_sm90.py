"""Ahead-of-time compile of every Triton kernel for Hopper (sm_90a), on a machine without a GPU.

``python -m sigma_moe_kernels._sm90 [--full] [--json F] [--md F]`` compiles each kernel of this
package for every configuration its launcher can pick at the Sigma-MoE-Tiny layer shape (T=8192,
D=1536, F=768, E=96): bf16 and fp32, the constexpr combinations (k, normalize, weights, the
GEMM variants) and every autotune config, through Triton's own compiler
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``).  The ``ptxas -v`` that
Triton runs on the way to the cubin reports registers, spills and stack; the PTX shows whether
the dots became ``wgmma`` (Hopper warpgroup MMA) or ``mma.sync``.

Without ``--full`` the sweep is the CI set (``tests/kernels/test_sm90_compile.py``): the GEMMs
in bf16 with every autotune config and in fp32 with the first, the router at k in {1, 8}.
``--full`` adds every k in 1..8, E in {32, 96, 256} for the router, all fp32 configs and the
other fp32 precisions.  Results are cached per (kernel source hash, signature, constexprs,
options, Triton version) in ``$SIGMA_MOE_SM90_CACHE`` (default ``~/.cache/sigma-moe/sm90``;
``0`` disables it), so an unchanged kernel is not recompiled; any kernel change recompiles.

Must run with triton in compiled mode (no ``TRITON_INTERPRET=1``): the interpreter replaces
every ``@triton.jit`` function.  The test tier runs this module in a subprocess for that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._backend import triton_is_interpreted

gs = importlib.import_module("sigma_moe_kernels.grouped_swiglu_triton")
gt = importlib.import_module("sigma_moe_kernels._gemm_tiles")
pm = importlib.import_module("sigma_moe_kernels.permute")
tr = importlib.import_module("sigma_moe_kernels.topk_route")

H100_SMEM_BYTES = 227 * 1024  # opt-in shared memory per block on H100 / H200
TINY = dict(T=8192, D=1536, F=768, E=96)
DTYPES = {"bf16": "*bf16", "fp32": "*fp32"}
GEMM_KERNELS = ("_gate_up_fwd_kernel", "_gmm_kernel", "_gmm_wgrad_kernel")


@dataclass
class Spec:
    """One compile: kernel + pointer types + constexprs + launch options."""

    module: str
    kernel: str
    dtype: str
    label: str
    ptrs: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    gemm: bool = False
    result: dict = field(default_factory=dict)

    @property
    def fn(self):
        return getattr(importlib.import_module(f"sigma_moe_kernels.{self.module}"), self.kernel)


# ---------------------------------------------------------------------------------------------
# the configurations each launcher can pick
# ---------------------------------------------------------------------------------------------
def _router_specs(full: bool) -> list[Spec]:
    out = []
    for E in (32, 96, 256) if full else (96,):
        BLOCK_T, BLOCK_E = tr._blocks(TINY["T"], E, cuda=True)
        for k in range(1, 9) if full else (1, 8):
            for norm in (False, True):
                blocks = dict(BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E)
                lab = f"E={E} k={k} normalize={norm} {BLOCK_T}x{BLOCK_E}"
                for dt, p in DTYPES.items():
                    ptrs = dict(logits_ptr=p, w_ptr="*fp32", e_ptr="*i64", probs_ptr="*fp32")
                    ptrs.update(psum_ptr="*fp32", cnt_ptr="*i32")
                    const = dict(K=k, NORMALIZE=norm, BLOCK_K=triton.next_power_of_2(k), **blocks)
                    out.append(Spec("topk_route", "_topk_route_fwd_kernel", dt, lab, ptrs, const))
                ptrs = dict(gw_ptr="*fp32", gps_ptr="*fp32", probs_ptr="*fp32", e_ptr="*i64")
                ptrs.update(w_ptr="*fp32", gl_ptr="*fp32")
                const = dict(K=k, NORMALIZE=norm, **blocks)
                out.append(Spec("topk_route", "_topk_route_bwd_kernel", "fp32", lab, ptrs, const))
    return out


def _permute_specs(full: bool) -> list[Spec]:
    T, D = TINY["T"], TINY["D"]
    out = []
    for dt, p in DTYPES.items():
        for k in range(1, 9) if full else (1, 8):
            BR, BD = pm._row_blocks(T * k, D, cuda=True)
            const = dict(BLOCK_R=BR, BLOCK_D=BD)
            ptrs = dict(src_ptr=p, idx_ptr="*i64", dst_ptr=p)
            if k in (1, 8):  # the gather has no k: its rows are T*k
                lab = f"N={T * k} {BR}x{BD}"
                out.append(Spec("permute", "_gather_rows_kernel", dt, lab, ptrs, const))
            BT, BD = pm._row_blocks(T * k, D, cuda=True)
            # weights in the activation dtype, as the MoE layer passes them (weights_TK.to(x.dtype))
            ptrs = dict(y_ptr=p, rm_ptr="*i64", w_ptr=p, out_ptr=p)
            for has_w in (True, False):
                const = dict(K=k, HAS_W=has_w, BLOCK_T=BT, BLOCK_D=BD)
                lab = f"k={k} weights={has_w} {BT}x{BD}"
                out.append(Spec("permute", "_combine_kernel", dt, lab, ptrs, const))
            BT, BD = pm._row_blocks(T, D, cuda=True, **pm._UNPERMUTE_BWD_GPU)
            ptrs = dict(g_ptr=p, y_ptr=p, rm_ptr="*i64", w_ptr=p, gy_ptr=p, gw_ptr="*fp32")
            const = dict(K=k, BLOCK_T=BT, BLOCK_D=BD)
            out.append(
                Spec("permute", "_unpermute_bwd_kernel", dt, f"k={k} {BT}x{BD}", ptrs, const)
            )
    return out


def _gemm_specs(full: bool) -> list[Spec]:
    what = {"gate_up": "gate/up fwd", "down": "down fwd", "dA": "dA + SwiGLU bwd"}
    what.update(dX="dX (two products)", dW2="dWg+dWu", dW1="dWd")
    out = []
    for (role, dt), configs in gt._CONFIGS.items():
        name, p = gt._ROLE_KERNEL[role], DTYPES[dt]
        fn = getattr(gs, name)
        ptrs = {a: p for a in fn.arg_names if a.endswith("_ptr")}
        ptrs.update({a: "*i64" for a in ("tile_r0_ptr", "tile_r1_ptr", "eid_ptr", "off_ptr")})
        ptrs.update(tile_e_ptr="*i32", cnt_ptr="*i64")
        ptrs = {a: t for a, t in ptrs.items() if a in fn.arg_names}
        # bf16: the launcher's "tf32" (ignored for 16-bit dots); fp32: the default (torch's
        # "highest" -> tf32x3), and with --full the other two
        precisions = ["tf32"] if dt == "bf16" else (list(gt.PRECISIONS) if full else ["tf32x3"])
        for prec in precisions:
            for cfg in configs:
                const = dict(DOT_FP32=False, PRECISION=prec, **gt._ROLE_FLAGS[role], **cfg.kwargs)
                if name != "_gmm_wgrad_kernel":
                    const.update(N_FASTEST=gs.N_FASTEST, BLOCK_M=gt._BLOCK_M)
                tiles = "x".join(str(v) for v in cfg.kwargs.values())
                lab = f"{what[role]} {prec} {tiles} w{cfg.num_warps} s{cfg.num_stages}"
                spec = Spec("grouped_swiglu_triton", name, dt, lab, ptrs, const, gemm=True)
                spec.num_warps, spec.num_stages = cfg.num_warps, cfg.num_stages
                out.append(spec)
    # the other grid order (gpu_check times it): one config of each row-tile kernel, bf16
    for s in [s for s in out if s.dtype == "bf16" and "N_FASTEST" in s.constexprs][::3]:
        m = Spec(**{**asdict(s), "constexprs": {**s.constexprs, "N_FASTEST": False}})
        m.label += " M-fastest"
        out.append(m)
    return out


def all_specs(full: bool = False) -> list[Spec]:
    return _router_specs(full) + _permute_specs(full) + _gemm_specs(full)


def jit_kernels() -> list[tuple[str, str]]:
    """(module, name) of every @triton.jit kernel (``_*_kernel``) in the kernel modules."""
    out = []
    for mod in (gs, pm, tr):
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction):
                out.append((mod.__name__.rsplit(".", 1)[1], name))
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# compile + measure
# ---------------------------------------------------------------------------------------------
def _source(spec: Spec) -> ASTSource:
    fn = spec.fn
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        sig[p.name] = spec.ptrs.get(p.name, "i32")
        # at the Tiny shape every pointer (torch allocations) and every size / stride is a
        # multiple of 16, which a real launch specialises on (vectorised loads)
        attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, constexprs=spec.constexprs, attrs=attrs)


def _cache_key(spec: Spec) -> str:
    key = [spec.fn.cache_key, spec.ptrs, spec.constexprs, spec.num_warps, spec.num_stages]
    key += [triton.__version__, 2]  # 2: the format of the cached result
    return hashlib.sha256(repr(key).encode()).hexdigest()[:32]


def _cache_dir() -> Path | None:
    v = os.environ.get("SIGMA_MOE_SM90_CACHE", str(Path.home() / ".cache/sigma-moe/sm90"))
    return None if v == "0" else Path(v)


def parse_ptxas(log: str) -> dict:
    def num(pat):
        m = re.search(pat, log)
        return int(m.group(1)) if m else None

    return {
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores") or 0,
        "spill_loads": num(r"(\d+) bytes spill loads") or 0,
        "stack": num(r"(\d+) bytes stack frame") or 0,
    }


def _run_ptxas(ptx: str) -> str:
    """`ptxas -v` on the PTX ourselves (a Triton without the dump_ptxas_log knob)."""
    from triton.backends.nvidia.compiler import get_ptxas  # only wheels with the NVIDIA backend

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        cmd = [get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull]
        return subprocess.run(cmd, capture_output=True, text=True).stderr


def compile_spec(spec: Spec) -> dict:
    """Compile for sm_90a; returns registers, spills, shared bytes, wgmma / mma.sync use."""
    cdir = _cache_dir()
    cfile = cdir / f"{_cache_key(spec)}.json" if cdir else None
    if cfile is not None and cfile.exists():
        return {**json.loads(cfile.read_text()), "cached": True}
    t0 = time.perf_counter()
    with contextlib.suppress(AttributeError):  # knobs of Triton 3.9; older ones: ptxas below
        triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints the `ptxas -v` it runs anyway
        # ... but only when it compiles: a hit in Triton's own cache would skip ptxas
        triton.knobs.compilation.always_compile = True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(
                _source(spec),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
            )
    except Exception as e:  # reported per spec; the test tier fails on it
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    ptx = k.asm["ptx"]
    regs = parse_ptxas(buf.getvalue())
    if regs["registers"] is None:
        regs = parse_ptxas(_run_ptxas(ptx))
    res = {
        "ok": True,
        **regs,
        "shared": int(k.metadata.shared),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if cfile is not None and res["registers"] is not None:
        cfile.parent.mkdir(parents=True, exist_ok=True)
        tmp = cfile.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(res))
        tmp.replace(cfile)
    return {**res, "cached": False}


_SPECS: list[Spec] = []


def _compile_index(i: int) -> dict:
    return compile_spec(_SPECS[i])


def run(full: bool = False, jobs: int = 2) -> dict:
    if triton_is_interpreted():
        raise RuntimeError(
            "the sm_90a compile needs compiled Triton: unset TRITON_INTERPRET for this command"
        )
    _SPECS[:] = all_specs(full)
    t0 = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as ex:
            results = list(ex.map(_compile_index, range(len(_SPECS))))
    else:
        results = [_compile_index(i) for i in range(len(_SPECS))]
    rows = []
    for s, r in zip(_SPECS, results):
        d = asdict(s)
        d["result"] = r
        rows.append(d)
    return {
        "triton": triton.__version__,
        "target": "cuda sm_90a (GPUTarget('cuda', 90, 32))",
        "full": full,
        "seconds": round(time.perf_counter() - t0, 1),
        "h100_smem_limit": H100_SMEM_BYTES,
        "jit_kernels": [list(x) for x in jit_kernels()],
        "specs": rows,
    }


def markdown(report: dict) -> str:
    lines = [
        f"Compiled by Triton {report['triton']} for {report['target']}, no GPU; "
        f"{len(report['specs'])} configurations in {report['seconds']} s "
        f"({'full sweep' if report['full'] else 'CI set'}).",
        "",
        "| kernel | dtype | configuration | warps | stages | registers | spills (st/ld B) "
        "| shared KB | wgmma | mma.sync |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["specs"]:
        r = s["result"]
        if not r.get("ok"):
            lines.append(f"| {s['kernel']} | {s['dtype']} | {s['label']} | FAILED: {r['error']} |")
            continue
        lines.append(
            f"| {s['kernel']} | {s['dtype']} | {s['label']} | {s['num_warps']} | "
            f"{s['num_stages']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
            f"{r['shared'] / 1024:.1f} | {r['wgmma']} | {r['mma_sync']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sigma_moe_kernels._sm90", description=__doc__)
    ap.add_argument("--full", action="store_true", help="every k / E / precision / fp32 config")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--md", help="write a markdown table here")
    a = ap.parse_args(argv)
    report = run(a.full, a.jobs)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if a.md:
        Path(a.md).write_text(markdown(report))
    bad = [s for s in report["specs"] if not s["result"].get("ok")]
    print(f"triton {report['triton']}: {len(report['specs'])} sm_90a compiles in "
          f"{report['seconds']} s, {len(bad)} failed", file=sys.stderr)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
