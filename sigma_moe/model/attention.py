"""Grouped-query attention with QK-norm and RoPE (Sigma-MoE-Tiny: 16 query / 4 KV heads)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from sigma_moe.model.config import SigmaMoEConfig


@functools.cache
def _flash_attn_func():
    """flash-attn's kernel when the optional `gpu` extra is installed, else None (torch SDPA)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 variance of a 1536-wide row loses ~3 significant digits.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rope_cache(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs_SH = torch.outer(t, inv)  # [S, head_dim/2]
    return freqs_SH.cos(), freqs_SH.sin()


def apply_rope(x_BHSd: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
    # Rotate-half layout (as Llama/Qwen), so an exported checkpoint needs no permutation.
    d2 = x_BHSd.shape[-1] // 2
    x1, x2 = x_BHSd[..., :d2], x_BHSd[..., d2:]
    cos, sin = cos_SH.to(x_BHSd.dtype), sin_SH.to(x_BHSd.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: SigmaMoEConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_eps)

    def forward(
        self,
        x_BSD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask_BSS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.q_norm(self.q_proj(x_BSD).view(B, S, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x_BSD).view(B, S, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H, S, d]
        if attn_mask_BSS is None and q.is_cuda and _flash_attn_func() is not None:
            # flash-attn (the `gpu` extra) takes [B, S, H, d] and handles GQA itself.
            y = _flash_attn_func()(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True
            )
            return self.o_proj(y.reshape(B, S, self.n_heads * self.head_dim))
        if attn_mask_BSS is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            # Block-diagonal causal mask (data.reset_at_eod): True = may attend.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask_BSS[:, None], enable_gqa=True
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
