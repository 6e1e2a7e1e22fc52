"""Online domain samplers: DoReMi-style exponentiated-gradient weights and an EXP3 bandit.

Both share ``OnlineSampler``: the weights ``w`` in force decide each sample's domain by
megatron's deterministic blending rule, kept running across steps (for every slot of the global
batch: ``target += w``, the domain is ``argmax(target − assigned)`` with ties to the lower id,
and its next unread sample is taken — ``(d, assigned[d])``, then ``assigned[d] += 1``). So the
keys of a step depend only on the state (``assigned``, ``target``, ``w``), which every rank
holds identically (the feedback is the all-reduced per-domain loss of the global batch): any
number of processes reads the same samples. Deterministic allocation rather than random draws:
over a step of G samples each domain gets within one sample of ``G·w``, so a mixture's effect is
not buried under sampling noise at the small batches used here.

Every ``update_every`` steps the accumulated per-domain losses update the weights; the result is
mapped above the floor by ``w = floor + (1 − K·floor)·p`` (a distribution, every entry
``>= floor``; ``floor·K <= 1`` is checked at config load).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sigma_moe.config import RunConfig
from sigma_moe.train.sampling import DomainLosses, Sampler, SamplerError, check_same_domains


def apply_floor(p: np.ndarray, floor: float) -> np.ndarray:
    """Map a distribution ``p`` to one whose entries are all ``>= floor``."""
    K = p.shape[0]
    return floor + (1.0 - K * floor) * p


def _allocate(
    w: np.ndarray, target: np.ndarray, assigned: np.ndarray, n: int
) -> list[tuple[int, int]]:
    """Megatron's deterministic blending rule for ``n`` slots (``target``, ``assigned`` are
    updated in place): ``target += w``, the domain is ``argmax(target − assigned)``."""
    keys = []
    for _ in range(n):
        target += w
        d = int(np.argmax(target - assigned))
        keys.append((d, int(assigned[d])))
        assigned[d] += 1
    return keys


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


class OnlineSampler(Sampler):
    online = True

    def __init__(
        self,
        domain_names: list[str],
        global_batch_size: int,
        init_weights: list[float],
        update_every: int = 1,
        floor: float = 0.0,
    ):
        self.domain_names = list(domain_names)
        K = len(self.domain_names)
        p = np.asarray(init_weights, dtype=np.float64)
        if p.shape != (K,) or not np.all(np.isfinite(p)) or (p < 0).any() or p.sum() <= 0:
            raise SamplerError(
                f"initial mixing weights {list(init_weights)} are not a distribution"
            )
        if update_every < 1:
            raise SamplerError(f"data.mixing.update_every must be >= 1, got {update_every}")
        if not 0 <= floor * K <= 1:
            raise SamplerError(f"data.mixing.floor={floor} × {K} domains must be in [0, 1]")
        self.G = int(global_batch_size)
        self.update_every = int(update_every)
        self.floor = float(floor)
        self.init_p = p / p.sum()
        self.w = apply_floor(self.init_p, self.floor)
        self.assigned = np.zeros(K, dtype=np.int64)
        self.target = np.zeros(K, dtype=np.float64)
        self.next_step = 0
        self.updates = 0
        self._acc: torch.Tensor | None = None  # [3, K] sums since the last update
        self._acc_ref = False
        self._cache: tuple[int, list[tuple[int, int]]] | None = None

    # ------------------------------------------------------------------ sampling

    def keys_for_step(self, step: int) -> list[tuple[int, int]]:
        step = int(step)
        if self._cache is not None and self._cache[0] == step:
            return list(self._cache[1])
        if step != self.next_step:
            raise SamplerError(
                f"online sampler asked for step {step}, but its state is at step "
                f"{self.next_step}: steps are drawn in order (a resume restores the state first)"
            )
        keys = _allocate(self.w, self.target, self.assigned, self.G)
        self.next_step = step + 1
        self._cache = (step, keys)
        return list(keys)

    def upcoming_keys(self, n: int) -> list[tuple[int, int]]:
        """The keys of the next ``n`` slots from the state now, without moving it: exactly the
        keys the next steps read until the weights next change (the Rho-1 scorer's plan)."""
        return _allocate(self.w, self.target.copy(), self.assigned.copy(), int(n))

    def weights(self) -> list[float]:
        return [float(x) for x in self.w]

    # ------------------------------------------------------------------ feedback

    def feedback(self, step: int, losses: DomainLosses) -> None:
        t = losses.packed()
        if not torch.isfinite(t).all():
            return  # a skipped (non-finite) step carries no signal
        self._acc = t.clone() if self._acc is None else self._acc + t
        self._acc_ref = self._acc_ref or losses.has_ref
        if (int(step) + 1) % self.update_every == 0:
            acc = DomainLosses.unpack(self._acc, self._acc_ref)
            self._acc, self._acc_ref = None, False
            self.w = apply_floor(self.update(acc), self.floor)
            self.updates += 1

    def update(self, losses: DomainLosses) -> np.ndarray:
        """The new distribution (before the floor) from the losses since the last update."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, st: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            # plain lists: exact floats, loadable by torch.load(weights_only=True)
            "w": self.w.tolist(),
            "assigned": self.assigned.tolist(),
            "target": self.target.tolist(),
            "next_step": self.next_step,
            "updates": self.updates,
            "acc": None if self._acc is None else self._acc.tolist(),
            "acc_ref": self._acc_ref,
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_domains(state, self.domain_names)
        if state.get("kind") != type(self).__name__:
            raise SamplerError(
                f"config key 'data.mixing.kind': the checkpoint's sampler is "
                f"{state.get('kind')!r}, this run builds {type(self).__name__!r}"
            )
        self.w = np.array(state["w"], dtype=np.float64)
        self.assigned = np.array(state["assigned"], dtype=np.int64)
        self.target = np.array(state["target"], dtype=np.float64)
        self.next_step, self.updates = int(state["next_step"]), int(state["updates"])
        acc = state["acc"]
        self._acc = None if acc is None else torch.tensor(acc, dtype=torch.float64)
        self._acc_ref = bool(state["acc_ref"])
        self._cache = None
        self._load_extra(state)


class DoReMiSampler(OnlineSampler):
    """DoReMi's Group-DRO step (Xie et al. 2023, Algorithm 1), online.

    With ``λ_i = Σ_tokens max(ℓ_θ − ℓ_ref, 0) / #tokens`` of domain i since the last update
    (0 for a domain not read), ``α' = α ⊙ exp(η λ)``, ``α = (1 − c)·α'/Σα' + c/K``; the weights
    in force are ``α`` above the floor. ``α`` starts at the configured domain weights.
    """

    def __init__(self, *args: Any, lr: float = 1.0, smoothing: float = 1e-3, **kw: Any):
        """``OnlineSampler``'s arguments, then DoReMi's step size η and smoothing c."""
        super().__init__(*args, **kw)
        self.lr, self.smoothing = float(lr), float(smoothing)
        self.alpha = self.init_p.copy()

    def update(self, losses: DomainLosses) -> np.ndarray:
        if not losses.has_ref:
            raise SamplerError(
                "online-doremi got no reference losses in the batch (rho1.reference scorer)"
            )
        tok = losses.tokens.numpy()
        lam = np.where(tok > 0, losses.excess_sum.numpy() / np.maximum(tok, 1.0), 0.0)
        log_a = np.log(np.maximum(self.alpha, 1e-300)) + self.lr * lam
        K = len(lam)
        self.alpha = (1.0 - self.smoothing) * _softmax(log_a) + self.smoothing / K
        self.last_excess = lam
        return self.alpha

    def _extra_state(self) -> dict[str, Any]:
        return {"alpha": self.alpha.tolist()}

    def _load_extra(self, st: dict[str, Any]) -> None:
        self.alpha = np.array(st["alpha"], dtype=np.float64)


class Exp3Sampler(OnlineSampler):
    """EXP3 over domains as in Online Data Mixing (Albalak et al. 2023, Algorithm 1).

    After the u-th update (u = 1, 2, …), for each domain i read since the last update with mean
    training CE ``L_i``: reward ``r_i = L_i`` (``reward="loss"``) or ``L_i^prev − L_i``
    (``"loss_decrease"``, from the domain's previous measured loss; skipped the first time),
    ``R̂_i ← α R̂_i + (1 − α) r_i / π_i`` (importance-weighted by the probability ``π_i`` it was
    read with). Exploration decays: ``ε_u = min(1/K, sqrt(ln K / (K·u)))``; the new policy is
    ``π = (1 − K ε_{u+1})·softmax(ε_u R̂) + ε_{u+1}``. Before any update ``π`` is uniform
    (``R̂ = 0``).
    """

    def __init__(
        self,
        domain_names: list[str],
        global_batch_size: int,
        update_every: int = 1,
        floor: float = 0.0,
        *,
        reward: str = "loss",
        alpha: float = 0.9,
    ):
        K = len(domain_names)
        super().__init__(domain_names, global_batch_size, [1.0] * K, update_every, floor)
        if reward not in ("loss", "loss_decrease"):
            raise SamplerError(f"data.mixing.bandit_reward must be loss or loss_decrease: {reward}")
        self.reward, self.alpha = reward, float(alpha)
        self.R = np.zeros(K, dtype=np.float64)
        self.prev_loss = np.full(K, np.nan)
        self.pi = np.full(K, 1.0 / K)
        self.w = apply_floor(self.pi, self.floor)

    def eps(self, u: int) -> float:
        K = len(self.domain_names)
        return min(1.0 / K, math.sqrt(math.log(K) / (K * u))) if u > 0 else 1.0 / K

    def update(self, losses: DomainLosses) -> np.ndarray:
        tok = losses.tokens.numpy()
        read = tok > 0
        L = np.where(read, losses.ce_sum.numpy() / np.maximum(tok, 1.0), np.nan)
        if self.reward == "loss":
            r, use = L, read
        else:
            r, use = self.prev_loss - L, read & np.isfinite(self.prev_loss)
        upd = self.alpha * self.R + (1.0 - self.alpha) * np.where(use, r, 0.0) / self.pi
        self.R = np.where(use, upd, self.R)
        self.prev_loss = np.where(read, L, self.prev_loss)
        u = self.updates + 1
        K = len(self.domain_names)
        e_new = self.eps(u + 1)
        self.pi = (1.0 - K * e_new) * _softmax(self.eps(u) * self.R) + e_new
        return self.pi

    def _extra_state(self) -> dict[str, Any]:
        return {"R": self.R.tolist(), "prev_loss": self.prev_loss.tolist(), "pi": self.pi.tolist()}

    def _load_extra(self, st: dict[str, Any]) -> None:
        self.R = np.array(st["R"], dtype=np.float64)
        self.prev_loss = np.array(st["prev_loss"], dtype=np.float64)
        self.pi = np.array(st["pi"], dtype=np.float64)


def build_sampler(cfg: RunConfig, domain_names: list[str]) -> Sampler:
    """The online mixer of ``cfg.data.mixing`` over ``domain_names`` (config order)."""
    m = cfg.data.mixing
    G = cfg.train.global_batch_size
    if m.kind == "online-doremi":
        return DoReMiSampler(
            domain_names,
            G,
            [d.weight for d in cfg.data.domains],
            m.update_every,
            m.floor,
            lr=m.doremi_lr,
            smoothing=m.doremi_smoothing,
        )
    if m.kind == "online-bandit":
        return Exp3Sampler(
            domain_names, G, m.update_every, m.floor, reward=m.bandit_reward, alpha=m.bandit_alpha
        )
    raise ValueError(f"config key 'data.mixing.kind': {m.kind!r} is not an online mixer")
