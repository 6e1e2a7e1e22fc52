"""The one error family of a run that stops on purpose or cannot go on safely.

Every layer may import this module (it imports nothing of the package). The training loop and
the CLI catch the base class, ``StopTraining``: its message names what to resume from, so the
CLI prints it without a traceback and exits 1.

- ``TrainingStopped``: stopped on purpose after writing a checkpoint (NaN policy: its subclass
  ``NonFiniteLoss``; a scorer failure during a step).
- ``ScorerFailure``: a data policy's side computation (the Rho-1 reference scorer) failed; the
  Rho-1 code raises its subclass ``sigma_moe.rho1.scoring.ScorerError``. Raised during a step, it
  is raised on every rank before any forward of that step, so the loop checkpoints the last
  completed step and raises ``TrainingStopped``.
- ``CheckpointError``: a checkpoint could not be written or read back safely.
- ``StageInterrupted``: a stage of a multi-stage command (demo, Rho-1 experiment, RegMix
  search) stopped before its last step; the command stops after it.
"""

from __future__ import annotations


class StopTraining(RuntimeError):
    """Base: the run stopped and the message says how to continue."""


class TrainingStopped(StopTraining):
    """The run stopped on purpose (NaN policy, scorer failure); a checkpoint was written."""


class NonFiniteLoss(TrainingStopped):
    """``train.nan_policy`` stopped the run on a non-finite loss."""


class ScorerFailure(StopTraining):
    """A data policy's scorer failed (base of the Rho-1 ``ScorerError``)."""


class CheckpointError(StopTraining):
    """A checkpoint could not be written (or read back) safely."""


class StageInterrupted(StopTraining):
    """A stage of a multi-stage command (demo, Rho-1 experiment) stopped before its last step
    (Ctrl-C, SIGTERM): the command stops after it, and its numbers are not reported."""
