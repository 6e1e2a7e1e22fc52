"""Which experts each domain uses: a domain × expert token-count matrix per layer.

The loop counts, for every step, the routed (token, slot) pairs of each domain at each expert of
each layer (``domain_expert_counts``; summed over the data-parallel group, so the matrix of a
layer sums over domains to that layer's global ``tokens_per_expert``). ``ExpertLoadByDomain``
accumulates the steps between evaluations and, at every eval boundary, appends one line to
``<run>/expert_load.jsonl`` (``{"step": s, "expert_load/<layer>/<domain>": [counts per expert]}``)
and draws the run's total as a heatmap (``plots/expert_load_by_domain.png``). The running sums are
its resumable state (``state_dict``: the checkpoint's ``callbacks/ExpertLoadByDomain``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sigma_moe.train.hooks import Callback


def domain_expert_counts(moe_stats, domain_B: torch.Tensor, num_domains: int) -> torch.Tensor:
    """[L, K, E] float64 counts of one micro-batch's routed (token, slot) pairs."""
    rows = []
    d_B = domain_B.detach().cpu().long()
    for s in moe_stats:
        E = s.tokens_per_expert_E.numel()
        e_TK = s.experts_TK.detach().cpu().long()
        T, k = e_TK.shape
        d_TK = d_B.repeat_interleave(T // d_B.numel())[:, None].expand(T, k)
        flat = (d_TK * E + e_TK).reshape(-1)
        rows.append(torch.bincount(flat, minlength=num_domains * E).view(num_domains, E))
    return torch.stack(rows).double()


def plot_expert_load(counts_LKE: np.ndarray, domains: list[str], path: Path, title: str) -> None:
    """One heatmap row block per layer: each domain's share of its tokens at each expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, K, E = counts_LKE.shape
    share = counts_LKE / np.maximum(counts_LKE.sum(axis=2, keepdims=True), 1.0)
    fig, axes = plt.subplots(
        L,
        1,
        figsize=(min(3.5 + 0.25 * E, 16), 1.0 + (0.3 * K + 0.4) * L),
        sharex=True,
        layout="constrained",
    )
    axes = np.atleast_1d(axes)
    vmax = float(share.max()) or 1.0
    for li, ax in enumerate(axes):
        im = ax.imshow(share[li], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(K), domains, fontsize=7)
        ax.set_title(f"layer {li}", fontsize=8, loc="left")
    axes[-1].set_xlabel("expert")
    fig.colorbar(im, ax=list(axes), label="share of the domain's tokens", shrink=0.9)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


class ExpertLoadByDomain(Callback):
    """Callback: accumulates ``trainer.step_domain_expert_LKE`` between evals (rank 0 writes)."""

    def __init__(self, out_dir: Path, eval_every: int, max_steps: int):
        """`eval_every`, `max_steps`: train.eval_every / train.max_steps (a line per eval)."""
        self.out_dir = Path(out_dir)
        self.eval_every, self.max_steps = eval_every, max_steps
        self.since_eval: np.ndarray | None = None
        self.total: np.ndarray | None = None

    def state_dict(self) -> dict:
        """The float64 sums since the last eval and since the start (None before any step), as
        plain lists (exact floats; a torch.load with weights_only=True reads them)."""
        return {
            "since_eval": None if self.since_eval is None else self.since_eval.tolist(),
            "total": None if self.total is None else self.total.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("since_eval", "total"):
            v = state[key]
            setattr(self, key, None if v is None else np.array(v, dtype=np.float64))

    def on_train_start(self, trainer) -> None:
        path = self.out_dir / "expert_load.jsonl"
        if trainer.world.is_main and path.is_file():
            # a killed run wrote lines past the resume point: they are trained and written again
            keep = [
                x
                for x in path.read_text().splitlines(keepends=True)
                if x.endswith("\n") and json.loads(x)["step"] <= trainer.state.step
            ]
            path.write_text("".join(keep))

    def on_step_end(self, trainer, m) -> None:
        c = trainer.step_domain_expert_LKE
        if c is None:
            return
        c = c.numpy()
        self.since_eval = c.copy() if self.since_eval is None else self.since_eval + c
        self.total = c.copy() if self.total is None else self.total + c
        if m["step"] % self.eval_every == 0 or m["step"] == self.max_steps:
            self._write(trainer, m["step"])
            self.since_eval = np.zeros_like(self.since_eval)

    def _write(self, trainer, step: int) -> None:
        if not trainer.world.is_main:
            return
        names = list(trainer.train_ds.domain_names)
        line: dict = {"step": step}
        for li in range(self.since_eval.shape[0]):
            for di, name in enumerate(names):
                line[f"expert_load/{li}/{name}"] = [int(x) for x in self.since_eval[li, di]]
        with (self.out_dir / "expert_load.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_end(self, trainer, last) -> None:
        if self.total is None or not trainer.world.is_main:
            return
        try:
            plot_expert_load(
                self.total,
                list(trainer.train_ds.domain_names),
                self.out_dir / "plots" / "expert_load_by_domain.png",
                f"{self.out_dir.name}: tokens per expert by domain (steps 1-{trainer.state.step})",
            )
        except Exception as e:  # a missing plot must never fail a finished run
            print(f"[plots] expert_load skipped: {e}")


def read_expert_load(run_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """(domain names, [L, K, E] counts summed over every line of ``expert_load.jsonl``)."""
    total: dict[tuple[int, str], np.ndarray] = {}
    for line in (Path(run_dir) / "expert_load.jsonl").read_text().splitlines():
        for k, v in json.loads(line).items():
            if k.startswith("expert_load/"):
                _, li, name = k.split("/", 2)
                key = (int(li), name)
                total[key] = total.get(key, 0) + np.asarray(v, dtype=np.float64)
    layers = sorted({li for li, _ in total})
    names = list(dict.fromkeys(n for _, n in total))
    return names, np.stack([np.stack([total[(li, n)] for n in names]) for li in layers])
