"""The typed plug-in points of the training loop: ``Callback`` (when something happens) and
``Objective`` (what a batch is trained on). Samplers (which samples a step reads) live in
``sigma_moe.train.sampling``. All three are ``Stateful``: what a resume needs of them is behind
``state_dict()`` / ``load_state_dict()``.

The loop (``sigma_moe.train.loop.Trainer``) calls every hook of every callback directly, in
the list's order; each hook here is a documented no-op, so a callback overrides only what it
needs (OLMo-core's ``train/callbacks/callback.py`` is the model). Order of a step:
``on_batches`` (before any forward) -> forward/backward/optimizer step -> ``on_step_end`` ->
``on_log`` (from the callbacks that log).

``Objective``: the per-token weights of the loss and the global-batch loss denominator. Plain
causal LM (``ClmObjective``) is the default; Rho-1 selection (``sigma_moe.rho1.callback``) is
another. An objective that also needs hooks (a scorer to start and stop) is a ``Callback`` too,
and the loop places it right after the checkpointer (see ``default_callbacks``).

Resumable state (torchtitan's "Stateful" components): the checkpoint saves ONE dict of named
states, ``{"sampler": ..., "objective": ..., "callbacks/<name>": ...}`` (``Trainer.components``:
only the components whose class overrides ``state_dict``), and a resume restores each exactly,
before ``on_train_start``. A checkpoint that lacks the state of one of the run's stateful
components is refused naming the component. The checkpointer reads ``state_dict()`` when it
saves, in its ``on_step_end``: the callbacks before it have seen the step, so a stateful
callback after it in the order must bring its state up to date earlier in the step (in
``on_batches``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # annotations only: the loop imports this module
    from sigma_moe.train.loop import Trainer


class Stateful:
    """A component with resumable state; by default none (``state_dict`` is ``{}``)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs to continue exactly (saved with ``torch.save``: tensors, numpy
        arrays and plain Python values keep every bit)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (on resume, before ``on_train_start``)."""


def has_state(component: Any) -> bool:
    """True when the component's class overrides ``Stateful.state_dict`` (a checkpoint must then
    hold its state)."""
    fn = getattr(type(component), "state_dict", None)
    return fn is not None and fn is not Stateful.state_dict


class Callback(Stateful):
    """Base of every callback; every hook is a no-op, and it has no resumable state unless it
    overrides ``state_dict`` / ``load_state_dict`` (``Stateful``)."""

    #: The key of its state in a checkpoint is ``callbacks/<name>``; the class name when empty.
    name: str = ""

    @property
    def state_key(self) -> str:
        return f"callbacks/{self.name or type(self).__name__}"

    def on_resume(self, trainer: Trainer) -> None:
        """Before ``on_train_start``: restore the trainer from a checkpoint (the checkpointer)."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Once, before the first step (after a resume: the step it resumes at)."""

    def on_batches(self, trainer: Trainer, batches: list[dict[str, torch.Tensor]]) -> None:
        """This rank's micro-batches of the step, before the loss denominator and any forward:
        add per-token fields (Rho-1: ``ref_loss``). An exception here leaves the weights as
        they were after the last completed step."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After the optimizer step, with the step's metrics (``trainer.state.step`` counts it)."""

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """A metrics line to record (train lines every ``train.log_every``, eval lines)."""

    def on_train_end(self, trainer: Trainer, last: dict[str, Any]) -> None:
        """Once, when the loop ends for any reason (also on an exception: see sys.exc_info)."""


class Objective(Stateful):
    """What a batch is trained on: plain causal LM by default (every valid token weight 1).
    Its resumable state (if any) is the checkpoint's ``objective`` entry."""

    def weight_sum(self, n_valid: torch.Tensor) -> float:
        """Σ token weights of the global batch from its valid-token counts ``[dp, accum]``
        (float64), known before any forward: the loss denominator of every micro-step."""
        return float(n_valid.sum())

    def token_weights(
        self, ce_BS: torch.Tensor, batch: dict[str, torch.Tensor], valid_BS: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-token weights of one micro-batch (``ce_BS``: its per-token cross-entropy) and the
        step's objective metrics so far (empty for plain CLM)."""
        return valid_BS.to(ce_BS.dtype), {}


class ClmObjective(Objective):
    """Plain causal LM: the defaults of ``Objective``."""


def stateful_components(sampler: Any, objective: Any, callbacks: list[Callback]) -> dict:
    """The run's named components that have resumable state (see the module doc); the objective
    is named once, as ``objective``, also when it is one of the callbacks. Two stateful
    callbacks under one name are a ValueError (set ``name`` on one of them)."""
    out: dict[str, Any] = {"sampler": sampler, "objective": objective}
    for cb in callbacks:
        if cb is objective or not has_state(cb):
            continue
        if cb.state_key in out:
            raise ValueError(
                f"two callbacks with resumable state are both named {cb.state_key!r}: give one "
                "of them another `name`"
            )
        out[cb.state_key] = cb
    return {k: c for k, c in out.items() if has_state(c)}


_HOOKS = ("on_resume", "on_train_start", "on_batches", "on_step_end", "on_log", "on_train_end")


class _Untyped(Callback):
    """A plain object with some of the hooks (older callers and test helpers): its methods are
    looked up once, here, and the missing hooks stay the base's no-ops."""

    def __init__(self, obj: Any):
        self.obj = obj
        for name in _HOOKS:
            fn = getattr(obj, name, None)
            if fn is not None:
                setattr(self, name, fn)


def as_callback(cb: Any) -> Callback:
    """``cb`` itself if it is a ``Callback``; a plain object with at least one hook, wrapped."""
    if isinstance(cb, Callback):
        return cb
    if not any(callable(getattr(cb, name, None)) for name in _HOOKS):
        raise TypeError(f"{cb!r} is not a training callback: it has none of the hooks {_HOOKS}")
    return _Untyped(cb)
