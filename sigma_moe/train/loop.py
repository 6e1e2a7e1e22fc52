"""The training loop: thin on purpose. Logging, eval and checkpoints are callbacks
(`sigma_moe.train.callbacks`); what a batch is trained on is the `Objective` and which samples a
step reads the `Sampler` (`hooks.py`, `sampling.py`; Rho-1 and the online mixers implement
them); this file only turns samples into optimizer steps. The `Trainer` takes the `train`
section and the `LoopFacts` of the others; `run_training` (with `loop_facts`) is its builder,
the only code here that reads the whole run config.

Loss normalisation: every micro-batch's summed token loss is divided by the number of trained-on
tokens of the WHOLE global batch (known before the forward: loss masks and the Rho-1 selection
count are fixed by the data), so 1, 2 or 4 processes and any micro-batch split give the same
loss and gradient (Megatron's per-token loss; tests/train and tests/parallel check parity).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from sigma_moe.config import RunConfig, TopkPhase, TrainConfig, save_config
from sigma_moe.data.batch import block_causal_mask, masked_labels
from sigma_moe.data.dataset import build_training_data, build_val_datasets, collate
from sigma_moe.data.tokenizer import load_tokenizer
from sigma_moe.errors import ScorerFailure, TrainingStopped
from sigma_moe.model import SigmaMoEForCausalLM
from sigma_moe.parallel.grad_sum import GradSum, can_sum_gradients
from sigma_moe.parallel.wiring import ep_rank_for, wire_expert_parallel
from sigma_moe.train.callbacks import Summary, default_callbacks
from sigma_moe.train.collectives import agree_all, all_gather, all_reduce_
from sigma_moe.train.domain_stats import domain_expert_counts
from sigma_moe.train.engine import (
    World,
    build_optimizer,
    deepspeed_config,
    effective_zero_stage,
    init_distributed,
    lr_at,
    measure_peak_flops,
    topk_for_step,
)
from sigma_moe.train.evaluate import domain_val_losses, eval_metrics
from sigma_moe.train.hooks import (
    Callback,
    ClmObjective,
    Objective,
    Stateful,
    as_callback,
    stateful_components,
)
from sigma_moe.train.runlock import RunLock, check_run_folder
from sigma_moe.train.sampling import DomainLosses, Sampler, StaticSampler

# (cfg, tokenizer, num_samples) -> (train dataset, its sampler, extra callbacks)
DataPolicy = Callable[[RunConfig, Any, int], tuple[Any, Sampler, list]]


# TrainingStopped: sigma_moe.errors's, re-exported for the callers that catch it from here
__all__ = ["LoopFacts", "TrainState", "Trainer", "TrainingStopped", "loop_facts", "run_training"]


@dataclass(frozen=True)
class LoopFacts:
    """What the loop needs of the config sections besides `train` (its builder,
    `_run_training`, passes them in; `loop_facts` reads them from the run config)."""

    seq_len: int  # data.seq_len: tokens per sample (the step's token count, MFU)
    topk_schedule: tuple[TopkPhase, ...]  # model.topk_schedule (progressive sparsification)
    ep_size: int  # parallel.ep_size: each expert's grad lives on world/ep_size ranks
    zero_stage: int  # parallel.zero_stage as it runs (effective_zero_stage): 0 = the loop clips
    clean_domains: tuple[str, ...]  # names of the data.domains marked clean (clean_val_loss)
    accum: int  # gradient-accumulation steps for this process count (RunConfig.check_world)


def loop_facts(cfg: RunConfig, world_size: int) -> LoopFacts:
    """The `LoopFacts` of `cfg` on `world_size` processes (raises on a batch they cannot split)."""
    return LoopFacts(
        seq_len=cfg.data.seq_len,
        topk_schedule=tuple(cfg.model.topk_schedule),
        ep_size=cfg.parallel.ep_size,
        zero_stage=cfg.parallel.zero_stage,
        clean_domains=tuple(d.name for d in cfg.data.domains if d.clean),
        accum=cfg.check_world(world_size),
    )


@dataclass
class TrainState:
    """The loop's own counters, checkpointed as client state; the sampler's, the objective's
    and the callbacks' resumable state is theirs (``Trainer.components``, ``hooks.Stateful``)."""

    step: int = 0
    consumed_samples: int = 0
    tokens: int = 0
    nan_skips: int = 0


@dataclass
class StepSums:
    """What the micro-steps of one step add up: this rank's, then (``all_reduce``) the global
    batch's. The float sums are float64 (Python floats), as the losses are reported."""

    domain_losses: DomainLosses  # per-domain sums (the sampler's feedback)
    lm: float = 0.0  # Σ token-weighted CE: the loss numerator (lm_loss = lm / denominator)
    ce_all: float = 0.0  # Σ CE over every valid token (lm_loss_all)
    n_valid: float = 0.0  # valid (loss-masked-in) tokens
    aux: float = 0.0  # Σ auxiliary losses (load balance + z), one term per micro-step
    weight: float = 0.0  # Σ token weights (selected_frac = weight / n_valid)
    nonfinite: float = 0.0  # micro-steps whose loss was not finite
    domain_expert_LKE: Any = 0.0  # domain × layer × expert token counts
    counts_LE: torch.Tensor | None = None  # tokens per expert per layer
    entropy_L: torch.Tensor | None = None  # router entropy per layer, mean over micro-steps
    dropped: int = 0  # tokens dropped by expert capacity
    objective_metrics: dict[str, float] = field(default_factory=dict)  # the step's so far
    bad_step: bool = False  # a non-finite micro-step: the update is skipped
    grad_norm0: float | None = None  # ZeRO-0: the norm the loop clipped with

    def add_micro_step(self, out, b, ce_BS, valid_BS, w_BS, lm_sum, aux, finite, n_micro) -> None:
        """One micro-step's losses and MoE statistics (`out`: the model's output)."""
        self.lm += float(lm_sum.detach())
        self.ce_all += float((ce_BS.detach() * valid_BS).sum())
        self.n_valid += float(valid_BS.sum())
        self.aux += float(aux.detach())
        self.weight += float(w_BS.sum())
        self.nonfinite += float(not finite)
        self.domain_losses.add_micro_batch(ce_BS, valid_BS, b["domain"], b.get("ref_loss"))
        n_dom = self.domain_losses.ce_sum.numel()
        self.domain_expert_LKE = self.domain_expert_LKE + domain_expert_counts(
            out.moe_stats, b["domain"], n_dom
        )
        c = torch.stack([s.tokens_per_expert_E for s in out.moe_stats]).double()
        self.counts_LE = c if self.counts_LE is None else self.counts_LE + c
        ent = torch.stack([s.router_entropy for s in out.moe_stats]).double() / n_micro
        self.entropy_L = ent if self.entropy_L is None else self.entropy_L + ent
        self.dropped += sum(s.dropped_tokens for s in out.moe_stats)

    def all_reduce(self, dp: int) -> None:
        """Sum over the data-parallel group (every rank then holds the global batch's): one
        float64 all-reduce of everything packed (each collective is a sync point that costs a
        gloo round trip, ~0.25 ms for a few floats on 2 CPU processes, plus whatever the ranks
        drift apart)."""
        scalars = torch.tensor(
            [self.lm, self.ce_all, self.n_valid, self.aux, self.weight, self.nonfinite],
            dtype=torch.float64,
        )
        parts = [  # on the CPU: entropy_L is on the model's device (all_reduce_ moves the one)
            scalars,
            torch.as_tensor(self.domain_expert_LKE, dtype=torch.float64),
            self.domain_losses.packed(),
            self.entropy_L,
        ]
        parts = [t.detach().to("cpu", torch.float64) for t in parts]
        flat = all_reduce_(torch.cat([t.reshape(-1) for t in parts]))
        out = [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in parts]), parts)]
        self.lm, self.ce_all, self.n_valid, self.aux, self.weight, self.nonfinite = out[0].tolist()
        self.domain_expert_LKE = out[1]
        self.domain_losses = DomainLosses.unpack(out[2], self.domain_losses.has_ref)
        self.entropy_L = out[3] / dp


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def balance_metrics(
    counts_LE: torch.Tensor, router_entropy_L: torch.Tensor, topk: list[int]
) -> dict[str, float]:
    """Per-layer balance of one step's global counts: load max/mean, coefficient of variation
    (std/mean over experts), entropy of the load distribution / log E (1 = even), share of
    experts that got no token, and the router's mean per-token entropy / log E."""
    E = counts_LE.shape[1]
    mean_L1 = counts_LE.mean(dim=1, keepdim=True).clamp_min(1e-9)
    share_LE = counts_LE / counts_LE.sum(dim=1, keepdim=True).clamp_min(1e-9)
    load_entropy_L = torch.special.entr(share_LE).sum(dim=1) / np.log(max(E, 2))
    m: dict[str, float] = {}
    for li, k in enumerate(topk):
        m[f"expert_load_max/{li}"] = float(counts_LE[li].max() / mean_L1[li])
        m[f"expert_load_cv/{li}"] = float(counts_LE[li].std(unbiased=False) / mean_L1[li])
        m[f"expert_load_entropy/{li}"] = float(load_entropy_L[li])
        m[f"expert_idle_frac/{li}"] = float((counts_LE[li] == 0).double().mean())
        m[f"router_entropy/{li}"] = float(router_entropy_L[li])
        m[f"topk/{li}"] = k
    return m


class Trainer:
    """The loop. `train`: the run's `train` section; `facts`: what it needs of the others."""

    def __init__(
        self,
        train: TrainConfig,
        facts: LoopFacts,
        world: World,
        engine,
        model,
        train_ds,
        val_ds,
        tokenizer,
        callbacks: list[Callback],
        sampler: Sampler | None = None,
        objective: Objective | None = None,
        grad_sum: GradSum | None = None,
    ):
        self.train_cfg, self.facts, self.world = train, facts, world
        # Which samples each step reads (sigma_moe.train.sampling); the static blend by default.
        self.sampler = sampler or StaticSampler(train_ds, train.global_batch_size)
        self.step_domain_expert_LKE: torch.Tensor | None = None  # last step's, all ranks
        self.engine, self.model = engine, model
        self.train_ds, self.val_ds, self.tokenizer = train_ds, val_ds, tokenizer
        self.callbacks = [as_callback(cb) for cb in callbacks]
        self.state = TrainState()
        self.dp = world.world_size
        self.accum = facts.accum
        # Who reduces the gradients over the ranks: DeepSpeed averages (the loss is scaled by
        # dp to undo that), `grad_sum` sums (sigma_moe/parallel/grad_sum.py: the ZeRO-0 path).
        self.grad_sum = grad_sum
        self.loss_dp = 1 if grad_sum is not None else self.dp
        self.peak_flops = measure_peak_flops(world.device)
        self.stop_requested: str | None = None
        # What each batch is trained on (token weights, loss denominator); plain CLM by default.
        self.objective = objective or ClmObjective()
        # What a checkpoint saves besides the weights and `state` (hooks.py: "Resumable state").
        self.components: dict[str, Stateful] = stateful_components(
            self.sampler, self.objective, self.callbacks
        )

    # ------------------------------------------------------------------ data

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for `step`: micro j of the global batch goes to rank j % dp,
        so the global batch's content does not depend on the number of processes."""
        mb = self.train_cfg.micro_batch_size
        keys = self.sampler.keys_for_step(step)
        out = []
        for a in range(self.accum):
            j = a * self.dp + self.world.rank
            samples = [self.train_ds.get_domain_sample(*keys[j * mb + i]) for i in range(mb)]
            batch = collate(samples)
            out.append(
                {k: v.to(self.world.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            )
        return out

    def _global_weight_sum(self, batches) -> float:
        """Σ of token weights over the whole global batch, before any forward (see module doc)."""
        n_local = torch.tensor(
            [float((b["loss_mask"] > 0).sum()) for b in batches], dtype=torch.float64
        )
        if self.dp > 1:
            n_all = torch.stack(all_gather(n_local))  # [dp, accum]
        else:
            n_all = n_local[None]
        return float(self.objective.weight_sum(n_all))

    # ------------------------------------------------------------------ step

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step: schedule, this rank's micro-batches, forward/backward of each,
        the data-parallel sums, the sampler's feedback, then the step's metrics."""
        t0 = time.perf_counter()
        topk, lr = self._schedule(step)
        batches = self.micro_batches(step)
        for cb in self.callbacks:
            cb.on_batches(self, batches)
        denom = max(self._global_weight_sum(batches), 1.0)
        sums = self._forward_backward(batches, denom)
        if self.dp > 1:
            sums.all_reduce(self.dp)
        self.step_domain_expert_LKE = sums.domain_expert_LKE
        mix_weights = self.sampler.weights()  # the weights this step was drawn with
        self.sampler.feedback(step, sums.domain_losses)
        # Global-batch counts (summed over the data-parallel group); the aux-loss-free bias
        # steps from them, except on a skipped (non-finite) step, which leaves the model as is.
        counts_LE = self.model.end_step_balance(sums.counts_LE, update_bias=not sums.bad_step)
        self.state.step = step + 1
        self.state.consumed_samples += self.train_cfg.global_batch_size
        n_tokens = self.train_cfg.global_batch_size * self.facts.seq_len
        self.state.tokens += n_tokens
        dt = time.perf_counter() - t0
        m = self._metrics(step, sums, denom, lr, n_tokens, dt)
        m.update(balance_metrics(counts_LE, sums.entropy_L, topk))
        m.update(sums.objective_metrics)
        if self.sampler.online and mix_weights is not None:
            for name, w in zip(self.sampler.domain_names, mix_weights):
                m[f"mix_weight/{name}"] = w
        return m

    def _schedule(self, step: int) -> tuple[list[int], float]:
        """Top-k of every layer (model.topk_schedule) and the learning rate of `step`, set."""
        topk = topk_for_step(self.model.config.router_topk, self.facts.topk_schedule, step)
        self.model.set_topk(topk)
        lr = lr_at(self.train_cfg, step)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        return topk, lr

    def _forward_backward(self, batches: list[dict[str, torch.Tensor]], denom: float) -> StepSums:
        """Forward, backward and DeepSpeed's micro-step of every micro-batch; `denom` is the
        global batch's Σ token weights (the objective's, known before any forward)."""
        sums = StepSums(domain_losses=DomainLosses.zeros(len(self.sampler.domain_names)))
        for a, b in enumerate(batches):
            last = a == len(batches) - 1
            out = self.engine(
                b["input_ids"],
                labels=masked_labels(b),
                attn_mask_BSS=block_causal_mask(b.get("doc_ids")),
                return_logits=False,
            )
            ce_BS = out.loss_per_token
            valid_BS = b["loss_mask"] > 0
            w_BS, sums.objective_metrics = self.objective.token_weights(ce_BS, b, valid_BS)
            lm_sum = (ce_BS * w_BS).sum()
            aux = out.aux_losses["lb_loss"] + out.aux_losses["z_loss"]
            # DeepSpeed divides by accum (and, unless `grad_sum` reduces, averages over dp): undo
            # both so Σ over the global batch / denom is what the optimiser sees; aux is a
            # per-rank mean, averaged over the ranks either way.
            aux_scale = self.loss_dp / self.dp
            loss = lm_sum * (self.accum * self.loss_dp / denom) + aux.to(lm_sum.dtype) * aux_scale
            # every rank must agree, or their gradient reductions diverge (reduced on the
            # loss's device: one host sync, as before)
            finite = agree_all(torch.isfinite(loss.detach()))
            sums.add_micro_step(out, b, ce_BS, valid_BS, w_BS, lm_sum, aux, finite, len(batches))
            if not finite:
                # Never backpropagate a NaN/Inf: zero gradients keep DeepSpeed's micro-step
                # bookkeeping (and ZeRO's reduction hooks) consistent across ranks, and lr=0 on
                # the boundary leaves the weights untouched (AdamW's moments decay one step).
                sums.bad_step = True
                loss = sum(
                    (p * 0).sum() for p in self.engine.module.parameters() if p.requires_grad
                )
            if sums.bad_step and last:
                for g in self.engine.optimizer.param_groups:
                    g["lr"] = 0.0
            self.engine.backward(loss)
            if last and self.grad_sum is not None:
                self.grad_sum()
            if last and self.facts.zero_stage == 0:
                sums.grad_norm0 = self._clip_stage0()
            self.engine.step()
            del out, loss
        return sums

    def _metrics(
        self, step: int, sums: StepSums, denom: float, lr: float, n_tokens: int, dt: float
    ) -> dict[str, Any]:
        """The step's loss, throughput and optimizer figures (global-batch sums)."""
        tps = n_tokens / dt
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None and self.facts.zero_stage == 0:
            grad_norm = sums.grad_norm0
        m: dict[str, Any] = {
            "step": step + 1,
            "lm_loss": sums.lm / denom,
            "lm_loss_all": sums.ce_all / max(sums.n_valid, 1.0),
            "aux_loss": sums.aux / (self.accum * self.dp),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": self.state.tokens,
            "tokens_per_s": tps,
            "step_time_s": dt,
            "mfu": self.model.estimate_mfu(tps / self.dp, self.facts.seq_len, self.peak_flops),
            "selected_frac": sums.weight / max(sums.n_valid, 1.0),
            "dropped_tokens": sums.dropped,
            "nonfinite": sums.bad_step,
        }
        m["loss"] = m["lm_loss"] + m["aux_loss"]
        return m

    def _clip_stage0(self) -> float:
        """ZeRO-0 keeps no global grad norm and gets no clipping from DeepSpeed (engine.py passes
        it 0): one foreach norm over the reduced grads gives the logged norm and clips with it
        (DeepSpeed's formula: x max_norm / (norm + 1e-6) when below 1). fp32, no per-gradient
        float64 copy: that copy was 23% of a demo-cpu step at E=96 (torch.profiler on the 2-core
        CPU machine, docs/benchmarks/train-2026-12-01.md). Dense grads
        are identical on every rank; each expert's grad lives on world/ep_size ranks."""
        dense, expert = [], []
        for p in self.engine.module.parameters():
            if p.grad is not None:
                (dense if getattr(p, "allreduce", True) else expert).append(p)
        sq = torch.zeros(2)
        for i, ps in enumerate((dense, expert)):
            if ps:
                sq[i] = get_total_norm([p.grad for p in ps], foreach=True).float().square()
        if self.dp > 1:
            e = all_reduce_(sq[1:].clone())
            sq[1] = e[0] / (self.dp // self.facts.ep_size)
        total = sq.sum().sqrt()
        if self.train_cfg.grad_clip > 0:
            clip_grads_with_norm_(dense + expert, self.train_cfg.grad_clip, total, foreach=True)
        return float(total)

    # ------------------------------------------------------------------ eval

    def evaluate(self) -> dict[str, float]:
        """Per-domain validation CE over each domain's held-out split, shared across ranks."""
        clean = list(self.facts.clean_domains)
        mb, rank, device = self.train_cfg.micro_batch_size, self.world.rank, self.world.device
        val_loss = domain_val_losses(self.engine, self.val_ds, mb, rank, self.dp, device)
        return eval_metrics(val_loss, clean)

    # ------------------------------------------------------------------ run

    def log(self, metrics: dict[str, Any]) -> None:
        """Hand a metrics line to every callback's ``on_log`` (metrics.jsonl, wandb, ...)."""
        for cb in self.callbacks:
            cb.on_log(self, metrics)

    def fit(self) -> dict[str, Any]:
        for cb in self.callbacks:
            cb.on_resume(self)  # the checkpointer restores `state` and every component's state
        for cb in self.callbacks:
            cb.on_train_start(self)
        last: dict[str, Any] = {}
        failure: ScorerFailure | None = None
        try:
            while self.state.step < self.train_cfg.max_steps and self.stop_requested is None:
                try:
                    last = self.train_step(self.state.step)
                except ScorerFailure as e:
                    # Raised on every rank at the same call, before any forward of the step, so
                    # the weights are those of the last completed step: checkpoint them and
                    # stop, never train on without selection.
                    self.stop_requested, failure = "Rho-1 scorer failure", e
                    break
                for cb in self.callbacks:
                    cb.on_step_end(self, last)
        finally:
            for cb in self.callbacks:
                cb.on_train_end(self, last)
        if failure is not None:
            raise TrainingStopped(
                f"{failure}; training stopped after step {self.state.step} with a checkpoint "
                "(fix the scorer, then --resume auto)"
            ) from failure
        return last


def run_training(
    cfg: RunConfig,
    out_dir: str | Path,
    resume: str = "none",
    extra_callbacks: list | None = None,
    data_policy: DataPolicy | None = None,
    objective: Objective | None = None,
) -> dict[str, Any]:
    """Train `cfg` into `out_dir` (config.yaml, metrics.jsonl, checkpoints/, wandb/, plots/).
    `resume`: "none", "auto" (newest complete checkpoint in out_dir/checkpoints, if any) or a
    checkpoint path. Returns the summary dict (also written to out_dir/summary.json).
    The folder is owned by this run while it trains (`sigma_moe.train.runlock`; rank 0 holds
    the lock): a second run into it is refused with the holder's pid.
    `data_policy(cfg, tokenizer, num_samples) -> (train_ds, sampler, callbacks)` builds the
    training data and its sampler (the run assembly of an online mixer passes one:
    `sigma_moe.run_mixing`); default: the static blend of `data.domains`.
    `objective`: what each batch is trained on (default plain CLM); the run assembly
    (`sigma_moe.run`) passes the Rho-1 one when `rho1.mode` selects tokens. An `Objective` among
    `extra_callbacks` is taken as the objective too."""
    if data_policy is None and cfg.data.mixing.kind != "static":
        raise ValueError(
            f"config key 'data.mixing.kind': {cfg.data.mixing.kind!r} needs the mixing run "
            "assembly (`sigma-moe train`, or sigma_moe.run.run_training)"
        )
    extra = list(extra_callbacks or [])
    if objective is None:
        objective = next((cb for cb in extra if isinstance(cb, Objective)), None)
    if cfg.rho1.mode != "none" and objective is None:
        raise ValueError(
            f"config key 'rho1.mode': {cfg.rho1.mode!r} needs the Rho-1 objective: train through "
            "the run assembly (`sigma-moe train`, sigma_moe.run.run_training) or pass "
            "objective=sigma_moe.rho1.callback.Rho1Callback(cfg.rho1, out_dir, run_config=cfg)"
        )
    # An objective with hooks runs at the policy place of the callback order.
    policy = [objective] if isinstance(objective, Callback) else []
    extra = [cb for cb in extra if cb is not objective]
    out_dir = Path(out_dir)
    check_run_folder(out_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with RunLock(out_dir) if rank0 else contextlib.nullcontext():
        return _run_training(cfg, out_dir, resume, extra, data_policy, objective, policy)


def _run_training(
    cfg: RunConfig,
    out_dir: Path,
    resume: str,
    extra_callbacks: list,
    data_policy: DataPolicy | None,
    objective: Objective | None,
    policy: list[Callback],
) -> dict[str, Any]:
    out_dir = Path(out_dir)
    world = init_distributed()
    cfg.check_world(world.world_size)  # fail early: ep_size or the batch vs the process count
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    # What runs (engine, checkpoint layout, meta.json); config.yaml keeps the recipe's stage so a
    # resume on more processes still shards.
    stage = effective_zero_stage(cfg.parallel.zero_stage, world.world_size)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=stage))
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    num_samples = cfg.train.max_steps * cfg.train.global_batch_size
    sampler, policy_callbacks = None, []
    if data_policy is not None:
        train_ds, sampler, policy_callbacks = data_policy(cfg, tokenizer, num_samples)
    else:
        train_ds = build_training_data(cfg.data, num_samples, cfg.train.seed, tokenizer)
    val_ds = build_val_datasets(
        cfg.data.domains,
        cfg.data.seq_len,
        tokenizer,
        max_samples_per_domain=cfg.data.val_samples_per_domain,
    )
    mcfg = cfg.build_model(tokenizer.vocab_size)
    model = SigmaMoEForCausalLM(mcfg, ep_rank=ep_rank_for(cfg.parallel.ep_size))
    if cfg.train.compile:
        model = torch.compile(model)  # the kernels are torch.library custom ops: traceable
    optimizer = build_optimizer(model, cfg.train)
    facts = loop_facts(cfg, world.world_size)
    ds_config = deepspeed_config(cfg.train, cfg.parallel, facts.accum)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    grad_sum = GradSum(engine.module) if can_sum_gradients(engine) else None
    if grad_sum is not None or (world.world_size == 1 and cfg.parallel.zero_stage == 0):
        # one process: nothing to all-reduce (DeepSpeed's bucketed all-reduce over the 1-process
        # gloo group cost ~7% of a ZeRO-0 demo-cpu step at E=96, profiled in
        # docs/benchmarks/train-2026-12-01.md); ZeRO-0 on more: GradSum reduces instead
        engine.enable_backward_allreduce = False
    base_model = engine.module._orig_mod if hasattr(engine.module, "_orig_mod") else engine.module
    wire_expert_parallel(base_model, cfg.parallel.ep_size)
    callbacks = default_callbacks(cfg, out_dir, world, resume, policy) + extra_callbacks
    callbacks += policy_callbacks
    trainer = Trainer(
        cfg.train,
        facts,
        world,
        engine,
        base_model,
        train_ds,
        val_ds,
        tokenizer,
        callbacks,
        sampler,
        objective,
        grad_sum,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer.fit()
    return next(cb.summary for cb in callbacks if isinstance(cb, Summary))
