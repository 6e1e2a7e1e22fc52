"""The per-expert ``torch.mm`` loop for grouped SwiGLU, kept only for the "alternatives" table
of `sigma-moe bench kernels`: it lost to the ranged bmm and ``torch._grouped_mm`` (one small
call per expert pays an OpenMP fork/join and packs a weight panel for ~43 rows; the measured
figures are in the comment above ``_plan`` in ``sigma_moe_kernels/grouped_swiglu_torch.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sigma_moe_kernels.grouped_swiglu_torch import _counts_list, _swiglu_bwd


def fwd_torch_loop(x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD):
    N, D = x_ND.shape
    Fdim = wg_EDF.shape[2]
    counts = _counts_list(counts_E, N)
    x_ND = x_ND.contiguous()
    hg_NF = x_ND.new_empty(N, Fdim)
    hu_NF = x_ND.new_empty(N, Fdim)
    y_ND = x_ND.new_empty(N, D)
    s = 0
    for e, n in enumerate(counts):
        if n:
            xe = x_ND[s : s + n]
            torch.mm(xe, wg_EDF[e], out=hg_NF[s : s + n])
            torch.mm(xe, wu_EDF[e], out=hu_NF[s : s + n])
            s += n
    a_NF = F.silu(hg_NF).mul_(hu_NF)
    s = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a_NF[s : s + n], wd_EFD[e], out=y_ND[s : s + n])
            s += n
    return y_ND, hg_NF, hu_NF


def bwd_torch_loop(dy_ND, x_ND, counts_E, wg_EDF, wu_EDF, wd_EFD, hg_NF, hu_NF):
    N, D = x_ND.shape
    counts = _counts_list(counts_E, N)
    dy_ND = dy_ND.contiguous()
    x_ND = x_ND.contiguous()
    dA_NF = torch.empty_like(hg_NF)
    s = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(dy_ND[s : s + n], wd_EFD[e].t(), out=dA_NF[s : s + n])
            s += n
    a_NF, dhg_NF, dhu_NF = _swiglu_bwd(dA_NF, hg_NF, hu_NF)
    dwg = torch.zeros_like(wg_EDF)
    dwu = torch.zeros_like(wu_EDF)
    dwd = torch.zeros_like(wd_EFD)
    dx_ND = torch.empty_like(x_ND)
    s = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sl = slice(s, s + n)
        xe_t = x_ND[sl].t()
        torch.mm(a_NF[sl].t(), dy_ND[sl], out=dwd[e])
        torch.mm(xe_t, dhg_NF[sl], out=dwg[e])
        torch.mm(xe_t, dhu_NF[sl], out=dwu[e])
        dxe = dx_ND[sl]
        torch.mm(dhg_NF[sl], wg_EDF[e].t(), out=dxe)
        dxe.addmm_(dhu_NF[sl], wu_EDF[e].t())
        s += n
    return dx_ND, dwg, dwu, dwd
