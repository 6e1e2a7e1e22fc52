"""Our checkpoints ↔ Hugging Face transformers' Qwen3-MoE layout.

Why Qwen3-MoE: it is the transformers architecture that is ours exactly — GQA with QK-norm
(RMSNorm over each head before RoPE, rotate-half RoPE), RMSNorm pre-norm, a float32 softmax
router over all experts whose gate is the top-k probability (`norm_topk_prob=False`), SwiGLU
experts, no shared expert, no bias — so logits match with no custom code.

Names and files come from transformers itself: the export fills a `Qwen3MoeForCausalLM` built
from a `Qwen3MoeConfig` and calls its `save_pretrained` (which writes the per-expert
`mlp.experts.<e>.{gate,up,down}_proj.weight` names every transformers version reads), the
import calls `AutoModelForCausalLM.from_pretrained`. Only the in-memory tensor mapping is ours:

    ours (EP=1 layout)                                      transformers 5 in memory
    embed.weight                                            model.embed_tokens.weight
    layers.i.attn_norm.weight                               model.layers.i.input_layernorm.weight
    layers.i.attn.{q,k,v,o}_proj.weight, {q,k}_norm.weight  model.layers.i.self_attn.<same>
    layers.i.moe_norm.weight                                model.layers.i.post_attention_layernorm.weight
    layers.i.moe.router.weight [E, D]                       model.layers.i.mlp.gate.weight
    …experts w_gate_EDF, w_up_EDF [E, D, F]                 …mlp.experts.gate_up_proj [E, 2F, D]
    …experts w_down_EFD [E, F, D]                           …mlp.experts.down_proj [E, D, F]
    norm.weight, lm_head.weight                             model.norm.weight, lm_head.weight
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from sigma_moe.data.tokenizer import EOD_TOKEN, load_tokenizer
from sigma_moe.model import SigmaMoEConfig, SigmaMoEForCausalLM
from sigma_moe.model.checkpoint_format import (
    META,
    UNIVERSAL,
    model_config_record,
    resolve_checkpoint,
)
from sigma_moe.model.checkpoint_io import read_checked_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts.0."
# Names whose tensor is the same under both layouts (after the prefixes below).
_SAME = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "attn.q_norm", "attn.k_norm"]


def _layer_names(i: int) -> list[tuple[str, str]]:
    ours, hf = f"layers.{i}.", f"model.layers.{i}."
    pairs = [
        (ours + s + ".weight", hf + s.replace("attn.", "self_attn.") + ".weight") for s in _SAME
    ]
    pairs += [
        (ours + "attn_norm.weight", hf + "input_layernorm.weight"),
        (ours + "moe_norm.weight", hf + "post_attention_layernorm.weight"),
        (ours + "moe.router.weight", hf + "mlp.gate.weight"),
    ]
    return pairs


def _top_names() -> list[tuple[str, str]]:
    return [
        ("embed.weight", "model.embed_tokens.weight"),
        ("norm.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ]


def to_hf_state(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Our full (EP=1) state dict → transformers 5's in-memory Qwen3-MoE names. Raises
    ValueError naming any tensor of ours the layout cannot hold (router bias, shared experts)."""
    out, used = {}, set()
    for i in range(num_layers):
        for a, b in _layer_names(i):
            out[b], _ = state[a], used.add(a)
        pre = f"layers.{i}.{_EXPERTS}"
        g, u, d = (state[pre + n] for n in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"))
        used.update(pre + n for n in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"))
        hf = f"model.layers.{i}.mlp.experts."
        out[hf + "gate_up_proj"] = torch.cat([g.transpose(1, 2), u.transpose(1, 2)], dim=1)
        out[hf + "down_proj"] = d.transpose(1, 2)
    for a, b in _top_names():
        out[b], _ = state[a], used.add(a)
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(
            f"tensors {extra[:4]}{' …' if len(extra) > 4 else ''} have no place in the Qwen3-MoE "
            "layout (it has no router bias and no shared experts)"
        )
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state(
    sd: dict[str, torch.Tensor], num_layers: int, ffn: int
) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state` (transformers 5's in-memory names → ours)."""
    out = {}
    for i in range(num_layers):
        for a, b in _layer_names(i):
            out[a] = sd[b]
        hf, pre = f"model.layers.{i}.mlp.experts.", f"layers.{i}.{_EXPERTS}"
        gu = sd[hf + "gate_up_proj"]
        out[pre + "w_gate_EDF"] = gu[:, :ffn].transpose(1, 2).contiguous()
        out[pre + "w_up_EDF"] = gu[:, ffn:].transpose(1, 2).contiguous()
        out[pre + "w_down_EFD"] = sd[hf + "down_proj"].transpose(1, 2).contiguous()
    for a, b in _top_names():
        out[a] = sd[b] if b in sd else sd["model.embed_tokens.weight"]  # tied: no lm_head
    return out


# --------------------------------------------------------------------------- export


def _single_topk(cfg: SigmaMoEConfig, ckpt: Path, meta: dict[str, Any]) -> int:
    ks = list(cfg.router_topk)
    if len(set(ks)) == 1:
        return ks[0]
    by_k: dict[int, list[int]] = {}
    for i, k in enumerate(ks):
        by_k.setdefault(k, []).append(i)
    groups = ", ".join(f"layers {v} top-{k}" for k, v in sorted(by_k.items()))
    ends = ""
    run_cfg = ckpt / "config.yaml"
    if run_cfg.is_file():
        sched = ((yaml.safe_load(run_cfg.read_text()) or {}).get("model") or {}).get(
            "topk_schedule"
        ) or []
        if sched:
            ends = f"; model.topk_schedule ends at step {max(p['until_step'] for p in sched)}"
    raise ValueError(
        f"checkpoint {ckpt} (step {meta.get('step')}) routes with different top-k per layer "
        f"({groups}): progressive sparsification has not ended{ends}. Qwen3-MoE has one "
        "num_experts_per_tok for every layer; export a checkpoint saved after the schedule"
    )


def refuse_unexportable(cfg: SigmaMoEConfig) -> None:
    if cfg.num_shared_experts:
        raise ValueError(
            f"model.num_shared_experts={cfg.num_shared_experts}: Qwen3-MoE has no shared "
            "experts, so this model cannot be exported to it"
        )
    if cfg.router_bias_update != "none":
        raise ValueError(
            f"model.router_bias_update={cfg.router_bias_update!r}: the router's expert bias "
            "changes which experts are picked, and Qwen3-MoE's router has no bias"
        )


def qwen3_config(cfg: SigmaMoEConfig, topk: int, eod: int, dtype: torch.dtype):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.moe_ffn_size,  # dense-MLP width; unused: every layer is MoE
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,
        use_sliding_window=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=cfg.moe_ffn_size,
        num_experts=cfg.num_experts,
        num_experts_per_tok=topk,
        norm_topk_prob=False,
        router_aux_loss_coef=cfg.lb_coeff,
        bos_token_id=None,
        eos_token_id=eod,
        pad_token_id=eod,
        dtype=dtype,
    )


def _run_tokenizer(ckpt: Path, meta: dict[str, Any]):
    run_cfg = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    tok = load_tokenizer((run_cfg.get("data") or {}).get("tokenizer", "bundled"))
    want = meta.get("tokenizer_fingerprint")
    if want is not None and want != tok.fingerprint:
        raise ValueError(
            f"checkpoint {ckpt} was trained with tokenizer {want}, but its config's "
            f"data.tokenizer ({tok.path}) is {tok.fingerprint}: put the original tokenizer back"
        )
    return tok


def export_hf(ckpt: str | Path, out_dir: str | Path, dtype: str = "fp32") -> Path:
    """Write `out_dir` (safetensors, config.json, generation_config.json, tokenizer files) that
    `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load as they are."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3MoeForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    ckpt = resolve_checkpoint(ckpt)  # checks the manifest, once: read_checked_checkpoint trusts it
    config, state, meta = read_checked_checkpoint(ckpt)
    model = SigmaMoEForCausalLM.from_state_dict(config, state, ckpt)
    cfg = model.config
    refuse_unexportable(cfg)
    topk = _single_topk(cfg, ckpt, meta)
    tok = _run_tokenizer(ckpt, meta)
    state = to_hf_state(model.state_dict(), cfg.num_layers)
    hf_cfg = qwen3_config(cfg, topk, tok.eod, DTYPES[dtype])
    hf = Qwen3MoeForCausalLM(hf_cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]:
        raise ValueError(f"Qwen3-MoE layout mismatch: missing {missing}, unexpected {unexpected}")
    hf = hf.to(DTYPES[dtype]).eval()
    hf.generation_config = GenerationConfig(eos_token_id=tok.eod, pad_token_id=tok.eod)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    PreTrainedTokenizerFast(
        tokenizer_file=str(tok.path), eos_token=EOD_TOKEN, pad_token=EOD_TOKEN
    ).save_pretrained(out)
    # save_pretrained re-serialises tokenizer.json (same vocabulary, other bytes, so another
    # fingerprint): put ours back so that the export is accepted wherever our tokenizer is
    # checked (a Rho-1 `rho1.reference`, datasets prepared with it).
    shutil.copyfile(tok.path, out / "tokenizer.json")
    return out


# --------------------------------------------------------------------------- import


def refuse_unimportable(c, where: Path) -> None:
    """Raise ValueError naming what of a transformers config Sigma-MoE cannot express."""
    mt = getattr(c, "model_type", None)

    def no(msg: str) -> None:
        raise ValueError(f"{where}: {msg}; Sigma-MoE cannot express it, so it is not imported")

    if mt != "qwen3_moe":
        extra = " (it has shared experts)" if mt in ("qwen2_moe", "deepseek_v3") else ""
        no(f"model_type {mt!r}{extra} is not 'qwen3_moe'")
    if getattr(c, "shared_expert_intermediate_size", 0) or getattr(c, "n_shared_experts", 0):
        no("shared experts")
    if c.mlp_only_layers or c.decoder_sparse_step != 1:
        no(
            f"dense layers (mlp_only_layers={c.mlp_only_layers}, "
            f"decoder_sparse_step={c.decoder_sparse_step}): every layer of ours is MoE"
        )
    if c.use_sliding_window:
        no(f"sliding-window attention (sliding_window={c.sliding_window})")
    if c.attention_bias:
        no("attention projections with bias")
    if c.norm_topk_prob:
        no("norm_topk_prob=True (our gate is the un-renormalised top-k probability)")
    if c.hidden_act != "silu":
        no(f"hidden_act {c.hidden_act!r} (our experts are SwiGLU)")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        no(f"RoPE scaling {rope}")


def _our_config(c) -> SigmaMoEConfig:
    return SigmaMoEConfig(
        vocab_size=c.vocab_size,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim or c.hidden_size // c.num_attention_heads,
        num_experts=c.num_experts,
        moe_ffn_size=c.moe_intermediate_size,
        router_topk=c.num_experts_per_tok,
        tie_embeddings=bool(c.tie_word_embeddings),
        rope_theta=float(c.rope_parameters["rope_theta"]),
        rms_eps=float(c.rms_norm_eps),
        max_seq_len=int(c.max_position_embeddings),
        lb_coeff=float(c.router_aux_loss_coef),  # kept so that export → import → export is bitwise
    )


def _run_config(cfg: SigmaMoEConfig, tokenizer: Path) -> dict[str, Any]:
    """A recipe that rebuilds these shapes (`sigma-moe train OUT/config.yaml --resume OUT`)."""
    fields = ["num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim"]
    fields += ["num_experts", "moe_ffn_size"]
    model = {"preset": "demo-cpu", **{f: getattr(cfg, f) for f in fields}}
    model["router_topk"] = cfg.router_topk[0]
    model["lb_coeff"] = cfg.lb_coeff
    for f in ("tie_embeddings", "rope_theta", "rms_eps", "vocab_size"):  # not in every preset
        model[f] = getattr(cfg, f)
    return {"model": model, "data": {"tokenizer": str(tokenizer.resolve())}}


def import_hf(hf_dir: str | Path, out_ckpt: str | Path, force: bool = False) -> Path:
    """Write a transformers Qwen3-MoE folder as one of our checkpoints (step 0, fresh optimizer
    state, layout-free `universal_state.pt` format): `from_checkpoint`, `export-hf`, a Rho-1
    `rho1.reference` and `sigma-moe train OUT/config.yaml --resume OUT` read it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src, out = Path(hf_dir), Path(out_ckpt)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} holds no config.json: not a transformers model folder")
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src} holds no tokenizer.json (a fast tokenizer is needed)")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")
    hf_cfg = AutoConfig.from_pretrained(src)
    refuse_unimportable(hf_cfg, src)
    tok = load_tokenizer(src / "tokenizer.json")  # refuses one without <|endoftext|>
    cfg = _our_config(hf_cfg)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{src}: tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}"
        )
    hf = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    state = from_hf_state(hf.state_dict(), cfg.num_layers, cfg.moe_ffn_size)
    model = SigmaMoEForCausalLM(cfg)
    model.load_state_dict(state, strict=True)  # every shape checked against our layout
    state = {k: v.detach().clone() for k, v in state.items()}
    tmp = out.with_name(out.name + ".tmp-import")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(_universal_state(state), tmp / UNIVERSAL)
    shutil.copy2(src / "tokenizer.json", tmp / "tokenizer.json")
    run_cfg = _run_config(cfg, out / "tokenizer.json")
    (tmp / "config.yaml").write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    meta = {
        "format": "universal",
        "step": 0,
        "consumed_samples": 0,
        "tokenizer_fingerprint": tok.fingerprint,
        "ep_size": 1,
        "world_size": None,
        "zero_stage": None,
        "model_config": model_config_record(model),
        "param_shapes": {k: list(v.shape) for k, v in model.named_parameters()},
        "imported_from": str(src.resolve()),
    }
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def _universal_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The layout-free state `sigma_moe.train.reshape.load_reshaped` reads: weights, fp32
    masters, zero Adam moments at step 0 (a fresh optimizer on the imported weights)."""
    return {
        "module": state,
        "fp32": {k: v.float() for k, v in state.items()},
        "optim": {
            k: {"exp_avg": torch.zeros_like(v.float()), "exp_avg_sq": torch.zeros_like(v.float())}
            for k, v in state.items()
        },
        "step": {k: 0.0 for k in state},
        "train_state": {"step": 0, "consumed_samples": 0, "tokens": 0, "nan_skips": 0, "extra": {}},
        "ep_size": 1,
    }
