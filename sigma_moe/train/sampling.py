"""Which samples the next steps consume: the sampler interface the loop calls.

The loop asks the sampler for the ``(domain id, sample index within the domain)`` keys of a
step's global batch (``keys_for_step``; micro-batch ``j`` of the global batch is keys
``[j·mb, (j+1)·mb)`` and goes to rank ``j % dp``), reads those samples with
``TrainDataset.get_domain_sample``, and after the step hands the per-domain loss sums of the
whole global batch (all-reduced, so every rank sees the same numbers) back through
``feedback``. A sampler's resumable state lives behind ``state_dict`` / ``load_state_dict``
(``sigma_moe.train.hooks.Stateful``); the checkpoint saves it as the component ``sampler``.

``StaticSampler`` (the default) is megatron's static blend: global sample ``i`` is
``train_ds.domain_and_index(i)``, exactly what the loop read before this interface existed.
Online mixers (``sigma_moe.mixing``) implement the same class; ``train/`` never imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sigma_moe.train.hooks import Stateful


class SamplerError(ValueError):
    """A sampler cannot serve this run (e.g. a checkpoint of other domains)."""


@dataclass
class DomainLosses:
    """Per-domain sums over one step's global batch (float64 [K] tensors, K = domains).

    ``ce_sum``: Σ token CE over valid tokens; ``tokens``: number of valid tokens;
    ``excess_sum``: Σ max(CE − reference CE, 0) over valid tokens (zeros when the batch carried
    no ``ref_loss``); ``has_ref``: whether ``excess_sum`` is meaningful.
    """

    ce_sum: torch.Tensor
    tokens: torch.Tensor
    excess_sum: torch.Tensor
    has_ref: bool = False

    @staticmethod
    def zeros(num_domains: int) -> DomainLosses:
        z = torch.zeros(3, num_domains, dtype=torch.float64)
        return DomainLosses(z[0].clone(), z[1].clone(), z[2].clone())

    def add_micro_batch(
        self,
        ce_BS: torch.Tensor,
        valid_BS: torch.Tensor,
        domain_B: torch.Tensor,
        ref_BS: torch.Tensor | None = None,
    ) -> None:
        """Accumulate one micro-batch (detached values; CPU arithmetic in float64)."""
        K = self.ce_sum.numel()
        v = valid_BS.detach().cpu().double()
        ce = ce_BS.detach().cpu().double() * v
        d = domain_B.detach().cpu().long()
        self.ce_sum += torch.bincount(d, weights=ce.sum(1), minlength=K)
        self.tokens += torch.bincount(d, weights=v.sum(1), minlength=K)
        if ref_BS is not None:
            ex = (ce_BS.detach().cpu().double() - ref_BS.detach().cpu().double()).clamp_min(0)
            self.excess_sum += torch.bincount(d, weights=(ex * v).sum(1), minlength=K)
            self.has_ref = True

    def packed(self) -> torch.Tensor:
        """[3, K] float64, for one all-reduce over the data-parallel group."""
        return torch.stack([self.ce_sum, self.tokens, self.excess_sum])

    @staticmethod
    def unpack(t: torch.Tensor, has_ref: bool) -> DomainLosses:
        return DomainLosses(t[0].clone(), t[1].clone(), t[2].clone(), has_ref)


class Sampler(Stateful):
    """Base class: every hook documented, the feedback a no-op.

    Subclasses set ``domain_names`` and implement ``keys_for_step``. ``keys_for_step(step)``
    must return the same keys for the same step and state on every rank and any number of
    processes (it sees only the step, the global batch size and the state); an online sampler
    may require steps to be asked in order (resume restores its state first).
    """

    domain_names: list[str]
    #: True when the weights change during the run (the loop logs ``mix_weight/<domain>``).
    online: bool = False

    def keys_for_step(self, step: int) -> list[tuple[int, int]]:
        """``(domain id, sample index)`` of each sample of ``step``'s global batch, in order."""
        raise NotImplementedError

    def feedback(self, step: int, losses: DomainLosses) -> None:
        """Per-domain losses of ``step``'s global batch, after its optimizer step."""

    def weights(self) -> list[float] | None:
        """The sampling distribution in force for the next step (None: not a mixer)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Its kind and domains (a resume on other domains is refused); online samplers add
        their weights and accumulators."""
        return {"kind": type(self).__name__, "domain_names": list(self.domain_names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_domains(state, self.domain_names)


def check_same_domains(state: dict[str, Any], names: list[str]) -> None:
    old = state.get("domain_names")
    if old is not None and list(old) != list(names):
        raise SamplerError(
            f"config key 'data.domains': the checkpoint was trained on domains {list(old)}, "
            f"the config lists {list(names)}; resuming would re-map the data, so it is refused"
        )


class StaticSampler(Sampler):
    """Megatron's static blend: global sample ``step·G + j`` → ``train_ds.domain_and_index``."""

    def __init__(self, train_ds, global_batch_size: int):
        self.train_ds = train_ds
        self.global_batch_size = int(global_batch_size)
        self.domain_names = list(train_ds.domain_names)

    def keys_for_step(self, step: int) -> list[tuple[int, int]]:
        base = int(step) * self.global_batch_size
        return [self.train_ds.domain_and_index(base + j) for j in range(self.global_batch_size)]
