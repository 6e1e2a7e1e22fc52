"""grouped_swiglu: outputs and gradients (x and all three weights) vs the reference."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import sigma_moe_kernels as K
from sigma_moe_kernels import _mkl_batch
from sigma_moe_kernels.grouped_swiglu_torch import _plan


def _weights(E, D, F, dtype, device, gen):
    mk = lambda *s: (torch.randn(*s, generator=gen) / s[-2] ** 0.5).to(dtype)  # noqa: E731
    ws = [mk(E, D, F), mk(E, D, F), mk(E, F, D)]
    return [w.to(device).requires_grad_() for w in ws]


def _check(counts, D, F, backend, device, dtype=torch.float32, atol=1e-5, rtol=1e-4):
    gen = torch.Generator().manual_seed(int(sum(counts)) * 7 + len(counts) + D)
    E = len(counts)
    counts_E = torch.tensor(counts, dtype=torch.int64)
    N = int(counts_E.sum())
    x = torch.randn(N, D, generator=gen).to(dtype).to(device).requires_grad_()
    ws = _weights(E, D, F, dtype, device, gen)
    # reference in fp32 on the same (already rounded) values
    x_ref = x.detach().cpu().float().requires_grad_()
    ws_ref = [w.detach().cpu().float().requires_grad_() for w in ws]
    y = K.grouped_swiglu(x, counts_E.to(device), *ws, backend=backend)
    y_ref = K.reference.grouped_swiglu(x_ref, counts_E, *ws_ref)
    assert y.dtype == dtype and y.shape == (N, D)
    torch.testing.assert_close(y.detach().cpu().float(), y_ref.detach(), atol=atol, rtol=rtol)
    g = torch.randn(N, D, generator=gen).to(dtype)
    grads = torch.autograd.grad((y * g.to(device)).sum(), [x, *ws])
    grads_ref = torch.autograd.grad((y_ref * g.float()).sum(), [x_ref, *ws_ref])
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down"), grads, grads_ref):
        assert a.dtype == dtype, name
        # weight grads sum over an expert's rows: scale atol by sqrt(rows)
        scale = 1.0 if name == "x" else max(1.0, max(counts) ** 0.5)
        torch.testing.assert_close(
            a.cpu().float(), b, atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )
    return y


def _random_counts(N, E, gen):
    experts = torch.randint(0, E, (N,), generator=gen)
    return torch.bincount(experts, minlength=E).tolist()


# N = T*k rows; (T, k) grid folded into N since the op only sees sorted rows
@pytest.mark.parametrize("N", [1, 7, 128, 1031])
@pytest.mark.parametrize("E", [1, 8, 96])
def test_grouped_swiglu_matches_reference(N, E, backend, device):
    gen = torch.Generator().manual_seed(N + E)
    _check(_random_counts(N, E, gen), 48, 40, backend, device)


@pytest.mark.parametrize("D,F", [(80, 72), (16, 16), (33, 17)])
def test_odd_and_multi_tile_sizes(D, F, backend, device):
    gen = torch.Generator().manual_seed(D)
    _check(_random_counts(200, 8, gen), D, F, backend, device)


def test_topk8_rows(backend, device):
    # T=64 tokens with k=8 -> N=512 sorted rows over 96 experts
    gen = torch.Generator().manual_seed(5)
    experts = torch.rand(64, 96, generator=gen).argsort(-1)[:, :8]
    _check(torch.bincount(experts.flatten(), minlength=96).tolist(), 48, 40, backend, device)


def test_all_tokens_on_one_expert(backend, device):
    counts = [0] * 96
    counts[41] = 1031
    _check(counts, 48, 40, backend, device)


def test_empty_experts_get_zero_weight_grads(backend, device):
    counts = [0, 5, 0, 0, 70, 0, 3, 0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(78, 48, generator=gen).to(device).requires_grad_()
    ws = _weights(8, 48, 40, torch.float32, device, gen)
    y = K.grouped_swiglu(x, torch.tensor(counts, device=device), *ws, backend=backend)
    y.square().sum().backward()
    for w in ws:
        for e, c in enumerate(counts):
            if c == 0:
                assert torch.count_nonzero(w.grad[e]) == 0
            else:
                assert torch.count_nonzero(w.grad[e]) > 0
    _check(counts, 48, 40, backend, device)


def test_zero_rows(backend, device):
    x = torch.zeros(0, 48, device=device, requires_grad=True)
    ws = _weights(4, 48, 40, torch.float32, device, torch.Generator().manual_seed(0))
    y = K.grouped_swiglu(x, torch.zeros(4, dtype=torch.int64, device=device), *ws, backend=backend)
    assert y.shape == (0, 48)
    y.sum().backward()
    assert all(torch.count_nonzero(w.grad) == 0 for w in ws)


def test_bf16(backend, device):
    # bf16 inputs/weights, compared with an fp32 reference on the same rounded values. Ours
    # rounds the stored intermediates (h_gate, h_up, silu(h_gate)*h_up) and the outputs to bf16:
    # each rounding is <= 2^-9 relative; through three chained GEMMs with O(1) entries the errors
    # stay around 1-2% of the value, so rtol=atol=3e-2 (a bug, e.g. a wrong expert, is O(1)).
    gen = torch.Generator().manual_seed(2)
    _check(_random_counts(300, 8, gen), 48, 40, backend, device, torch.bfloat16, 3e-2, 3e-2)


def test_bad_args_raise(backend, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 48, device=device)
    c = torch.tensor([4, 6], device=device)
    wg, wu, wd = (w.detach() for w in _weights(2, 48, 40, torch.float32, device, gen))
    with pytest.raises(ValueError, match="tokens_per_expert_E"):
        K.grouped_swiglu(x, c[:1], wg, wu, wd, backend=backend)
    with pytest.raises(ValueError, match="tokens_per_expert_E"):
        K.grouped_swiglu(x, c.float(), wg, wu, wd, backend=backend)
    with pytest.raises(ValueError, match="w_gate_EDF"):
        K.grouped_swiglu(x[:, :40], c, wg, wu, wd, backend=backend)
    with pytest.raises(ValueError, match="w_up_EDF"):
        K.grouped_swiglu(x, c, wg, wu[:, :, :8], wd, backend=backend)
    with pytest.raises(ValueError, match="w_down_EFD"):
        K.grouped_swiglu(x, c, wg, wu, wd.transpose(1, 2), backend=backend)
    with pytest.raises(ValueError, match="w_gate_EDF"):
        K.grouped_swiglu(x, c, wg.double(), wu, wd, backend=backend)
    with pytest.raises(ValueError, match="x_sorted_ND"):
        K.grouped_swiglu(x[0], c, wg, wu, wd, backend=backend)


def test_counts_must_sum_to_rows():
    gen = torch.Generator().manual_seed(0)
    ws = [w.detach() for w in _weights(2, 48, 40, torch.float32, "cpu", gen)]
    with pytest.raises(ValueError, match="sum"):
        K.grouped_swiglu(torch.randn(10, 48), torch.tensor([4, 5]), *ws, backend="torch")


def test_gradcheck_torch_backend():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    ws = [
        torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()
        for s in ((3, 4, 3), (3, 4, 3), (3, 3, 4))
    ]
    assert torch.autograd.gradcheck(
        lambda x, a, b, c: K.grouped_swiglu(x, counts, a, b, c, backend="torch"), (x, *ws)
    )


def test_plan_pads_little_and_covers_every_expert():
    gen = torch.Generator().manual_seed(0)
    counts = _random_counts(4096, 96, gen)
    plan, P = _plan(counts, 48, 512)
    assert plan[0][0] == 0 and plan[-1][1] == 96
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    assert all(cap >= max(counts[e0:e1]) for e0, e1, cap, _ in plan)
    assert P < 1.3 * 4096
    skew = [0] * 96
    skew[3] = 4096
    plan, P = _plan(skew, 48, 512)
    assert P == 4096


@pytest.mark.skipif(not _mkl_batch.available(), reason="torch's MKL lacks cblas_sgemm_batch")
def test_mkl_batch_splits_large_experts_into_exact_pieces():
    counts = [0, 5, 1031, 0, 0, 7, 300]
    g = _mkl_batch.Groups(counts)
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + c)
    for e, c in enumerate(counts):  # each expert's rows covered once, in order
        starts, ms = g.r_start[g.r_e == e], g.r_m[g.r_e == e]
        assert int(ms.sum()) == c and (c == 0 or int(starts[0]) == offs[e])
        assert all(starts[1:] == starts[:-1] + ms[:-1])
    assert (g.r_e == 2).sum() > 1 and (g.parts > 1).any()  # the 1031-row expert is split
    assert g.empty_runs == [(0, 1), (3, 5)]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(offs[-1], 48, generator=gen), torch.randn(offs[-1], 40, generator=gen)
    b = torch.randn(7, 48, 40, generator=gen)
    out = torch.full((offs[-1], 40), float("nan"))
    g.rows_mm((x, b, out))
    (dw,) = g.weights_mm((x, y))
    for e in range(7):
        rows = slice(offs[e], offs[e + 1])
        torch.testing.assert_close(out[rows], x[rows] @ b[e])
        torch.testing.assert_close(dw[e], x[rows].t() @ y[rows], atol=1e-4, rtol=1e-5)


def test_weight_grads_allocated_empty_and_fully_written(backend, device, poison_empty):
    # the Triton backward allocates dW with empty (a zero-fill was ~680 MB of memset at the
    # Sigma-MoE-Tiny shape): every element, empty experts' included, must be written
    if backend == "torch":
        pytest.skip("the Triton launchers' allocation contract")
    counts = [0, 5, 0, 0, 70, 0, 3, 0]
    _check(counts, 48, 40, backend, device)
    assert (8, 48, 40) not in poison_empty and (8, 40, 48) not in poison_empty


def test_triton_path_checks_counts(backend, device):
    if backend == "torch":
        pytest.skip("the Triton launchers' checks")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 48, device=device)
    ws = [w.detach() for w in _weights(2, 48, 40, torch.float32, device, gen)]
    # counts that do not sum to N would make the kernels write out of bounds: an async device
    # assert (raised at once on CPU; on CUDA at the next sync, and it poisons the CUDA context,
    # so there it runs in a child process)
    if device.type == "cuda":
        code = (
            "import torch, sigma_moe_kernels as K\n"
            "x = torch.randn(10, 48, device='cuda')\n"
            "ws = [torch.randn(2, 48, 40, device='cuda'), torch.randn(2, 48, 40, device='cuda'),"
            " torch.randn(2, 40, 48, device='cuda')]\n"
            "K.grouped_swiglu(x, torch.tensor([4, 7], device='cuda'), *ws, backend='triton')\n"
            "torch.cuda.synchronize()\n"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert p.returncode != 0 and "assert" in p.stderr.lower(), p.stderr[-2000:]
    else:
        with pytest.raises(RuntimeError, match="sum to x_sorted_ND"):
            K.grouped_swiglu(x, torch.tensor([4, 7], device=device), *ws, backend=backend)
    # counts on another device (e.g. CPU counts for CUDA rows): the launcher refuses them (called
    # directly: a meta tensor through the public op would dispatch to the fake kernel)
    gs = importlib.import_module("sigma_moe_kernels.grouped_swiglu")
    with pytest.raises(ValueError, match="tokens_per_expert_E is on meta"):
        gs._fwd_triton(x, torch.tensor([4, 6], device="meta"), *ws)
    with pytest.raises(ValueError, match="int64"):
        gs._fwd_triton(x, torch.tensor([4, 6], device=device, dtype=torch.int16), *ws)


@pytest.mark.parametrize("precision,atol", [("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 5e-3)])
def test_input_precision_tolerances(precision, atol, backend, device):
    # on a GPU fp32 dots run as TF32 unless told otherwise (max error ~2e-3 here); the default
    # (tf32x3) and "ieee" hold fp32 parity, "tf32" gets a TF32 tolerance
    if backend != "triton" and precision != "tf32x3":
        pytest.skip("precision only changes the GPU kernels (the interpreter computes in fp32)")
    gen = torch.Generator().manual_seed(3)
    counts = _random_counts(200, 8, gen)
    N = sum(counts)
    x = torch.randn(N, 48, generator=gen).to(device).requires_grad_()
    ws = _weights(8, 48, 40, torch.float32, device, gen)
    y = K.grouped_swiglu(x, torch.tensor(counts, device=device), *ws, backend=backend,
                         input_precision=precision)  # fmt: skip
    x_ref = x.detach().cpu().requires_grad_()
    ws_ref = [w.detach().cpu().requires_grad_() for w in ws]
    y_ref = K.reference.grouped_swiglu(x_ref, torch.tensor(counts), *ws_ref)
    torch.testing.assert_close(y.detach().cpu(), y_ref.detach(), atol=atol, rtol=atol * 10)


def _check_gathered(counts, T, D, F, backend, device, gen, atol=1e-5, rtol=1e-4):
    """grouped_swiglu(x_TD, ..., gather_N) == grouped_swiglu(x_TD[gather_N], ...): output and
    every gradient (x_TD's summed over the rows that read it) against the plain reference."""
    N, E = sum(counts), len(counts)
    x = torch.randn(T, D, generator=gen).to(device).requires_grad_()
    gather = torch.randint(0, T, (N,), generator=gen)
    gather[: min(T, N)] = torch.randperm(T, generator=gen)[: min(T, N)]  # most rows read once
    ws = _weights(E, D, F, torch.float32, device, gen)
    counts_E = torch.tensor(counts)
    y = K.grouped_swiglu(x, counts_E.to(device), *ws, backend=backend, gather_N=gather.to(device))
    x_ref = x.detach().cpu().requires_grad_()
    ws_ref = [w.detach().cpu().requires_grad_() for w in ws]
    y_ref = K.reference.grouped_swiglu(x_ref[gather], counts_E, *ws_ref)
    torch.testing.assert_close(y.detach().cpu(), y_ref.detach(), atol=atol, rtol=rtol)
    g = torch.randn(N, D, generator=gen)
    grads = torch.autograd.grad((y * g.to(device)).sum(), [x, *ws])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x_ref, *ws_ref])
    scale = max(1.0, max(counts) ** 0.5)
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down"), grads, grads_ref):
        torch.testing.assert_close(
            a.cpu(), b, atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_gathered_rows_match_reference(chunk_bytes, backend, device, monkeypatch, request):
    """The permutation fused in (``gather_N``), at the default chunking and with every
    non-empty expert closing a backward chunk (``_CHUNK_BYTES`` = 1): awkward sizes, empty
    experts, one expert holding most rows, x rows read twice (top-2) and x rows read by nobody.
    On the torch backend fresh buffers are NaN-filled, so every element of dx and of each
    weight gradient (empty experts' zeros included) must be written."""
    import sigma_moe_kernels.grouped_swiglu_torch as gst

    if backend == "torch":
        request.getfixturevalue("poison_empty")
    if chunk_bytes is not None:
        monkeypatch.setattr(gst, "_CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(5)
    for counts, T in (
        (_random_counts(1031, 96, gen), 1031),  # top-1: a permutation
        ([0, 5, 0, 0, 70, 0, 3, 0], 41),  # top-2: 78 rows from 41 tokens (x rows read twice)
        ([200, 1, 0, 9], 300),  # skewed; 90 x rows read by no expert (their dx is zero)
    ):
        _check_gathered(counts, T, 33, 17, backend, device, gen)


def test_gathered_saves_x_not_the_gathered_rows():
    """What makes the fused path lean: autograd keeps x_TD and the index, not N x D rows."""
    gen = torch.Generator().manual_seed(0)
    T, D, F_, E = 64, 16, 8, 4
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    ws = _weights(E, D, F_, torch.float32, "cpu", gen)
    gather = torch.randperm(T, generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        K.grouped_swiglu(x, torch.tensor([16] * 4), *ws, backend="torch", gather_N=gather)
    assert any(t is x for t in saved)
    assert not any(t.shape == (T, D) and t is not x for t in saved)


def test_gather_index_is_checked():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=gen)
    ws = _weights(2, 16, 8, torch.float32, "cpu", gen)
    with pytest.raises(ValueError, match="gather_N must be a 1-D int64"):
        K.grouped_swiglu(x, torch.tensor([4, 4]), *ws, backend="torch", gather_N=torch.ones(8))
    with pytest.raises(ValueError, match="sum to"):
        K.grouped_swiglu(x, torch.tensor([4, 5]), *ws, backend="torch", gather_N=torch.arange(8))


def test_gathered_strided_x_bf16_and_permuted_weights():
    """A strided x_TD, weights with a permuted (dense) layout and bf16: the gradients come back
    contiguous and match the unfused op."""
    gen = torch.Generator().manual_seed(1)
    T, D, F_, E = 29, 24, 16, 5
    counts = torch.tensor([7, 0, 12, 3, 7])
    gather = torch.randperm(T, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        x0 = torch.randn(D, T, generator=gen).to(dtype)
        w0 = [torch.randn(D, E, F_, generator=gen).to(dtype) * 0.2 for _ in range(2)]
        w0.append(torch.randn(F_, E, D, generator=gen).to(dtype) * 0.2)
        g = torch.randn(T, D, generator=gen).to(dtype)
        x = x0.t().requires_grad_()  # [T, D], strided
        ws = [w.permute(1, 0, 2).requires_grad_() for w in w0]  # [E, ., .], not contiguous
        y = K.grouped_swiglu(x, counts, *ws, backend="torch", gather_N=gather)
        grads = torch.autograd.grad(y, [x, *ws], g)
        xr = x0.t().detach().requires_grad_()
        wr = [w.detach().contiguous().requires_grad_() for w in ws]
        yr = K.grouped_swiglu(xr[gather], counts, *wr, backend="torch")
        grads_ref = torch.autograd.grad(yr, [xr, *wr], g)
        tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(y, yr, **tol)
        for a, b in zip(grads, grads_ref):
            assert a.is_contiguous()
            torch.testing.assert_close(a, b, **tol)


def test_gathered_ops_pass_opcheck():
    """The custom ops' fake kernels, schemas and autograd agree with the real ones (what
    torch.compile relies on), with the gather index and a strided x_TD."""
    gs = importlib.import_module("sigma_moe_kernels.grouped_swiglu")
    gen = torch.Generator().manual_seed(2)
    T, D, F_, E = 20, 16, 8, 3
    x = torch.randn(D, T, generator=gen).t()
    ws = [torch.randn(E, D, F_, generator=gen), torch.randn(E, D, F_, generator=gen)]
    ws.append(torch.randn(E, F_, D, generator=gen))
    counts, gather = torch.tensor([6, 0, 14]), torch.randperm(T, generator=gen)
    torch.library.opcheck(gs._gs_fwd_op, (x, counts, *ws, gather, "torch", "auto"))
    y, hg, hu = gs._gs_fwd_op(x, counts, *ws, gather, "torch", "auto")
    dy = torch.randn_like(y)
    torch.library.opcheck(gs._gs_bwd_op, (dy, x, counts, *ws, hg, hu, gather, "torch", "auto"))
