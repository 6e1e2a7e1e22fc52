"""Reshaping checkpoints across expert-parallel (EP) and data-parallel (DP) sizes, optimizer
state included. DeepSpeed's universal-checkpoint conversion skips native MoE layers, so this is
ours.

What DeepSpeed 0.19.8 writes with ZeRO stage 1 or 2 and our MoE layers (E+D layout: the EP
group of global rank r is the block of `ep_size` consecutive ranks, its EP rank is r % ep_size,
its expert-data-parallel (EDP) rank r // ep_size):
  - `mp_rank_00_model_states.pt` (rank 0): dense weights, per-group `param_shapes`, client state
    (our `train_state`);
  - `layer_<l>_expert_<e>_mp_rank_00_model_states.pt` (EDP rank 0 of EP rank e): the stacked
    local experts of layer l on EP rank e;
  - `zero_pp_rank_<r>_mp_rank_00_optim_states.pt` (every rank): for each optimizer group, this
    rank's slice of the group's flat fp32 master copy (`single_partition_of_fp32_groups`) and of
    Adam's `exp_avg` / `exp_avg_sq` (`base_optimizer_state`), plus `param_slice_mappings`: which
    parameter occupies which (start, numel) range of that slice. Dense groups are partitioned
    over all ranks (rank order); expert groups (`moe: True`) over the EDP group of each EP rank,
    and hold that EP rank's experts.

`consolidate` turns this into a layout-free state: every parameter whole (all experts), with
its fp32 master copy, `exp_avg`, `exp_avg_sq` and Adam step. `load_reshaped` writes such a state
into a live engine of any EP/DP layout through DeepSpeed's `safe_set_full_*` API (ZeRO 1/2: each
rank keeps its own fragment). The Checkpointer uses it automatically when a checkpoint's
ep_size, process count or ZeRO stage differ from the run's; `sigma-moe convert-checkpoint`
writes the layout-free state once (a checkpoint folder with `universal_state.pt`) so later
loads skip the consolidation.

ZeRO stage 0 (fp32) is read too: there each EP rank writes its whole torch optimizer state,
indexed by position, to `expp_rank_<e>_mp_rank_00_optim_states.pt`; our meta.json records the
parameter names of those positions (`optimizer_param_names`). Not covered: bf16 without ZeRO
(DeepSpeed's BF16_Optimizer files) and tensor/pipeline parallelism (we use neither).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from sigma_moe.fs import fsync_dir
from sigma_moe.model.checkpoint_format import (
    MAIN_STATES,
    META,
    UNIVERSAL,
    checkpoint_problem,
    folder_manifest,
    is_expert_param,
    read_meta,
    resolve_checkpoint,
)
from sigma_moe.model.checkpoint_io import load_full_state_dict
from sigma_moe.parallel.wiring import ep_rank_for
from sigma_moe.train.log import log

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


def _strip(name: str) -> str:
    return name.removeprefix("_orig_mod.")


def _buffer_names(main: dict) -> set[str]:
    """Module buffers (e.g. the aux-loss-free router bias): saved, but without optimizer state."""
    return {_strip(n) for n in main.get("buffer_names") or []}


def consolidate(ckpt: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Layout-free state of a checkpoint: {"module": {name: full tensor}, "fp32": {name: full
    fp32 master}, "optim": {name: {"exp_avg", "exp_avg_sq"}}, "step": {name: Adam step},
    "train_state": {...}, "ep_size": source EP size}."""
    ckpt = Path(ckpt)
    meta = meta if meta is not None else read_meta(ckpt)
    if (ckpt / UNIVERSAL).is_file():
        return torch.load(ckpt / UNIVERSAL, map_location="cpu", weights_only=False)
    world, ep = int(meta["world_size"]), int(meta["ep_size"])
    main = torch.load(ckpt / MAIN_STATES, map_location="cpu", weights_only=False)
    files = [ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    if not files[0].is_file() and (ckpt / "expp_rank_0_mp_rank_00_optim_states.pt").is_file():
        return _consolidate_zero0(ckpt, meta, main, ep)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"checkpoint {ckpt}: cannot reshape, {', '.join(missing)} not found")
    local_shapes: dict[str, torch.Size] = {}
    for group in main["param_shapes"]:
        for n, s in group.items():
            local_shapes[_strip(n)] = torch.Size(s)
    # bucket: (EP rank for expert params, -1 for dense) → name → key → fragments in rank order
    frags: dict[int, dict[str, dict[str, list[torch.Tensor]]]] = {}
    steps: dict[str, float] = {}
    for r, f in enumerate(files):
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        groups, state = base["param_groups"], base["state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            moe = bool(groups[g].get("moe", False))
            bucket = frags.setdefault(r % ep if moe else -1, {})
            flat = {"fp32": osd["single_partition_of_fp32_groups"][g]}
            st = state[groups[g]["params"][0]]
            for k in OPTIM_KEYS:
                flat[k] = st[k]
            for name, addr in mapping.items():
                d = bucket.setdefault(_strip(name), {k: [] for k in flat})
                for k, t in flat.items():
                    d[k].append(t.detach().narrow(0, addr.start, addr.numel).clone())
                steps[_strip(name)] = float(st["step"])
    out: dict[str, Any] = {"fp32": {}, "optim": {}, "step": steps}
    expert_names = set()
    for key, bucket in frags.items():
        for name, d in bucket.items():
            if key >= 0:
                expert_names.add(name)
            whole = {k: torch.cat(v).view(local_shapes[name]) for k, v in d.items()}
            if key < 0:
                out["fp32"][name] = whole["fp32"]
                out["optim"][name] = {k: whole[k] for k in OPTIM_KEYS}
            else:
                for k, t in whole.items():
                    out.setdefault("_ep", {}).setdefault(name, {}).setdefault(k, {})[key] = t
    for name in expert_names:
        per = out["_ep"][name]
        joined = {k: torch.cat([per[k][e] for e in range(ep)], dim=0) for k in per}
        out["fp32"][name] = joined["fp32"]
        out["optim"][name] = {k: joined[k] for k in OPTIM_KEYS}
    out.pop("_ep", None)
    out["module"] = {_strip(k): v for k, v in load_full_state_dict(ckpt).items()}
    missing = sorted(set(out["module"]) - set(out["optim"]) - _buffer_names(main))
    if missing:
        raise ValueError(f"checkpoint {ckpt}: no optimizer state for {missing[:5]}")
    out["train_state"] = main["train_state"]
    out["ep_size"] = ep
    return out


def _consolidate_zero0(ckpt: Path, meta: dict[str, Any], main: dict, ep: int) -> dict[str, Any]:
    """ZeRO stage 0: each EP rank's whole torch optimizer state (indexed by position) in
    `expp_rank_<e>_mp_rank_00_optim_states.pt`; meta.json names the positions."""
    names = meta.get("optimizer_param_names")
    if not names:
        raise ValueError(
            f"checkpoint {ckpt}: a ZeRO-0 checkpoint without optimizer_param_names in {META} "
            "cannot be reshaped (it resumes on its own layout)"
        )
    module = {_strip(k): v for k, v in load_full_state_dict(ckpt).items()}
    out: dict[str, Any] = {"fp32": {}, "optim": {}, "step": {}}
    per_ep: dict[str, dict[str, list[torch.Tensor]]] = {}
    for e in range(ep):
        f = ckpt / f"expp_rank_{e}_mp_rank_00_optim_states.pt"
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer"]
        for g, gnames in zip(sd["param_groups"], names):
            moe = bool(g.get("moe", False))
            for i, n in zip(g["params"], gnames):
                st = sd["state"].get(i, {})
                shape = module[n].shape if not moe else None
                moments = {
                    k: st[k] if k in st else torch.zeros(shape or per_ep_shape(module[n], ep))
                    for k in OPTIM_KEYS
                }
                out["step"][n] = float(st.get("step", 0.0))
                if moe:
                    d = per_ep.setdefault(n, {k: [] for k in OPTIM_KEYS})
                    for k in OPTIM_KEYS:
                        d[k].append(moments[k])
                elif e == 0:
                    out["optim"][n] = moments
    for n, d in per_ep.items():
        out["optim"][n] = {k: torch.cat(v, dim=0) for k, v in d.items()}
    out["fp32"] = {n: v.float() for n, v in module.items()}
    out["module"] = module
    missing = sorted(set(module) - set(out["optim"]) - _buffer_names(main))
    if missing:
        raise ValueError(f"checkpoint {ckpt}: no optimizer state for {missing[:5]}")
    out["train_state"] = main["train_state"]
    out["ep_size"] = ep
    return out


def per_ep_shape(full: torch.Tensor, ep: int) -> torch.Size:
    return torch.Size([full.shape[0] // ep, *full.shape[1:]])


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _ensure_zero_optimizer_state(zopt, base, step_val: float) -> None:
    """ZeRO 1/2 create Adam's state at the first step; a reshaped load happens before it, so
    create it (zeros, overwritten next) and let DeepSpeed link each parameter's fragment."""
    flats = getattr(zopt, "single_partition_of_fp32_groups", None)
    if flats is None:
        return
    for flat in flats:
        st = base.state[flat]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(step_val, dtype=torch.float32, device=flat.device)
            st["exp_avg"] = torch.zeros_like(flat)
            st["exp_avg_sq"] = torch.zeros_like(flat)
    if hasattr(zopt, "_lazy_init_hp_params_optimizer_state"):
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()


def load_reshaped(trainer, ckpt: Path, meta: dict[str, Any], ep_size: int) -> dict[str, Any]:
    """Load a checkpoint of any EP/DP layout (or a converted one) into `trainer.engine`, laid
    out for this run's `ep_size` (parallel.ep_size): weights, fp32 master weights and Adam
    moments (each rank its own slice), Adam's step. Returns the checkpoint's train_state."""
    state = consolidate(ckpt, meta)
    ep_rank = ep_rank_for(ep_size)
    engine, model = trainer.engine, trainer.model
    base = _base_optimizer(engine)
    plain = {id(p) for g in base.param_groups for p in g["params"]}  # ZeRO-0: params themselves
    step_val = max(state["step"].values()) if state["step"] else 0.0
    _ensure_zero_optimizer_state(engine.optimizer, base, step_val)
    for name, p in model.named_parameters():
        key = _strip(name)
        if key not in state["module"]:
            raise ValueError(f"checkpoint {ckpt} has no parameter {key}")

        def local(t: torch.Tensor, p=p, key=key) -> torch.Tensor:
            if is_expert_param(p):
                n = p.shape[0]
                t = t.narrow(0, ep_rank * n, n)
            if t.shape != p.shape:
                raise ValueError(
                    f"checkpoint {ckpt}: {key} has shape {tuple(t.shape)} for this rank, the "
                    f"model's is {tuple(p.shape)}"
                )
            return t.contiguous()

        w32 = local(state["fp32"].get(key, state["module"][key]).float())
        with torch.no_grad():
            p.data.copy_(w32.to(device=p.device, dtype=p.dtype))
        moments = {k: local(state["optim"][key][k]).to(p.device) for k in OPTIM_KEYS}
        if hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, w32.to(p.device))
            for k, v in moments.items():
                safe_set_full_optimizer_state(p, v, k)
        elif id(p) in plain:
            st = base.state[p]
            for k, v in moments.items():
                st[k] = v.to(p.dtype).clone()
            st["step"] = torch.tensor(step_val, dtype=torch.float32)
        else:
            raise ValueError(f"cannot place optimizer state of {key}: unknown optimizer layout")
    with torch.no_grad():  # buffers (the router bias) are replicated: copied whole
        for name, buf in model.named_buffers():
            if _strip(name) in state["module"]:
                buf.copy_(state["module"][_strip(name)])
    for st in base.state.values():
        if "step" in st:
            old = st["step"]
            st["step"] = (
                torch.full_like(old, step_val) if torch.is_tensor(old) else type(old)(step_val)
            )
    ts = state["train_state"]
    engine.global_steps = ts["step"]
    engine.global_samples = ts["consumed_samples"]
    return ts


# --------------------------------------------------------------------------- CLI


def convert(src_path: str | Path, out: str | Path, ep_size: int, force: bool = False) -> Path:
    """Write a layout-free copy of a checkpoint (universal_state.pt + config.yaml with
    parallel.ep_size=ep_size + meta.json + RNG files) that loads with any process count."""
    src = resolve_checkpoint(src_path)
    meta = read_meta(src)
    n_exp = (meta.get("model_config") or {}).get("num_experts")
    cfg_dict = yaml.safe_load((src / "config.yaml").read_text())
    if ep_size < 1 or (n_exp and n_exp % ep_size):
        raise ValueError(f"--ep-size {ep_size} must be >= 1 and divide num_experts ({n_exp})")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")
        shutil.rmtree(out)
    state = consolidate(src, meta)
    tmp = out.with_name(out.name + ".tmp-convert")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / UNIVERSAL)
    for f in src.glob("rng_rank*.pt"):
        shutil.copy2(f, tmp / f.name)
    cfg_dict.setdefault("parallel", {})["ep_size"] = ep_size
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    new_meta = dict(meta)
    new_meta.update(
        format="universal",
        ep_size=ep_size,
        world_size=None,
        zero_stage=None,
        converted_from={
            "path": str(src),
            "ep_size": meta.get("ep_size"),
            "world_size": meta.get("world_size"),
        },
        **folder_manifest(tmp),  # sizes and sha256 of the new files
    )
    (tmp / META).write_text(json.dumps(new_meta, indent=1))
    fsync_dir(tmp)
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    problem = checkpoint_problem(out)
    if problem:
        raise ValueError(f"converted checkpoint {out} failed its own check: {problem}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sigma-moe convert-checkpoint",
        description="Reshape a checkpoint to another expert-parallel size (optimizer state "
        "included). The result loads with any number of processes: "
        "`sigma-moe train CONFIG --set parallel.ep_size=N --resume OUT`.",
    )
    p.add_argument("ckpt", help="a run's checkpoints/ folder, a run folder or one checkpoint")
    p.add_argument("out", help="the new checkpoint folder")
    p.add_argument("--ep-size", type=int, required=True, help="target expert-parallel size")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    try:
        out = convert(args.ckpt, args.out, args.ep_size, force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"sigma-moe convert-checkpoint: error: {e}", file=sys.stderr)
        return 2
    meta = read_meta(out)
    src = meta["converted_from"]
    log(
        f"wrote {out}: step {meta['step']}, ep_size {src['ep_size']} on {src['world_size']} "
        f"processes -> ep_size {args.ep_size} (loads on any number of processes divisible by it)"
    )
    return 0
