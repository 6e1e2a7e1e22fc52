"""Load-balancing options (issue 13): the coefficients' meaning, the aux-loss-free router bias
(update rule, choice vs gates, fp32 under bf16, checkpoint + bitwise resume, refusals), the
sequence-wise loss, shared experts, and the per-layer balance telemetry of a training run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sigma_moe.config import ConfigError, load_config
from sigma_moe.model import SigmaMoEConfig, SigmaMoEForCausalLM
from sigma_moe.model.moe import SigmaMoELayer
from sigma_moe.train.loop import balance_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from _ckpt_util import config as ckpt_config  # noqa: E402
from _ckpt_util import losses, train_in_process  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "test-tiny.yaml")


def _cfg(**kw) -> SigmaMoEConfig:
    return SigmaMoEConfig.preset("test-tiny", kernel_backend="torch", **kw)


def _layer_and_x(seed: int, shape: tuple[int, int], **kw):
    cfg = _cfg(**kw)
    torch.manual_seed(seed)
    layer = SigmaMoELayer(cfg, 0)
    return cfg, layer, torch.randn(*shape, cfg.hidden_size)


def _swiglu(x, wg, wu, wd):
    return (F.silu(x @ wg) * (x @ wu)) @ wd


# --------------------------------------------------------------------------- coefficients


def test_coefficients_are_per_layer_and_summed():
    """Megatron-core's meaning: aux = coeff · Σ_layers loss_l (not the mean over layers)."""
    torch.manual_seed(0)
    model = SigmaMoEForCausalLM(_cfg(num_layers=3, router_topk=1, lb_coeff=0.3, z_loss_coeff=0.7))
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids, labels=ids)
    lb = [float(s.lb_loss.detach()) for s in out.moe_stats]
    z = [float(s.z_loss.detach()) for s in out.moe_stats]
    assert len(lb) == 3 and min(lb) > 0.5  # N_E·Σ f·p is ~1 at any balance: a real number
    assert float(out.aux_losses["lb_loss"].detach()) == pytest.approx(0.3 * sum(lb), rel=1e-6)
    assert float(out.aux_losses["z_loss"].detach()) == pytest.approx(0.7 * sum(z), rel=1e-6)
    assert float(out.aux_losses["lb_loss"].detach()) != pytest.approx(0.3 * sum(lb) / 3, rel=1e-3)


def test_recipes_keep_their_former_mean_coefficients():
    """configs/ were rescaled so coeff · Σ equals the former 0.01 / 1e-3 · mean."""
    for name, layers in (("demo-cpu", 4), ("test-tiny", 2), ("sigma-moe-tiny", 56)):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.model.lb_coeff * layers == pytest.approx(0.01, rel=1e-3), name
        assert cfg.model.z_loss_coeff * layers == pytest.approx(1e-3, rel=1e-3), name


# --------------------------------------------------------------------------- router bias


def test_bias_update_matches_hand_computation():
    layer = SigmaMoELayer(_cfg(router_bias_update="aux_free", bias_update_rate=0.1), 0)
    counts = torch.tensor([5, 1, 3, 3, 0, 8, 2, 2])  # mean 3
    layer.update_router_bias(counts)
    want = torch.tensor([-0.1, 0.1, 0.0, 0.0, 0.1, -0.1, 0.1, 0.1])
    assert torch.equal(layer.router_bias_E, want)
    layer.update_router_bias(counts)
    assert torch.allclose(layer.router_bias_E, 2 * want)
    assert layer.router_bias_E.dtype == torch.float32


def test_bias_changes_the_choice_not_the_gates():
    cfg, layer, x = _layer_and_x(0, (2, 5), router_bias_update="aux_free", router_topk=1)
    y0, s0 = layer(x)
    with torch.no_grad():
        layer.router_bias_E[3] = 10.0  # larger than any probability gap: everyone picks 3
    y1, s1 = layer(x)
    assert s1.tokens_per_expert_E.tolist() == [0, 0, 0, 10, 0, 0, 0, 0]
    assert s0.tokens_per_expert_E[3] < 10
    x_TD = x.reshape(-1, cfg.hidden_size)
    p_TE = torch.softmax(x_TD @ layer.router.weight.T, dim=-1)
    w = layer.experts
    want = p_TE[:, 3:4] * _swiglu(x_TD, w.w_gate_EDF[3], w.w_up_EDF[3], w.w_down_EFD[3])
    assert torch.allclose(y1.reshape(-1, cfg.hidden_size), want, atol=1e-6)
    # p_3 is small (no bias in the gate): the output scale is the router's, not the bias's.
    assert float(p_TE[:, 3].detach().max()) < 0.5


def test_default_model_has_no_bias_and_no_shared_weights():
    sd = SigmaMoEForCausalLM(_cfg()).state_dict()
    assert not [k for k in sd if "router_bias" in k or ".shared." in k]
    sd = SigmaMoEForCausalLM(_cfg(router_bias_update="aux_free", num_shared_experts=1))
    keys = sd.state_dict().keys()
    assert "layers.0.moe.router_bias_E" in keys and "layers.1.moe.shared.w_gate_DF" in keys
    # DeepSpeed moves every key of an MoE module containing "expert" into the expert files.
    assert not [k for k in keys if "expert" in k and "deepspeed_experts" not in k]


def test_bias_stays_fp32_under_bf16():
    model = SigmaMoEForCausalLM(_cfg(router_bias_update="aux_free")).bfloat16()
    blk = model.layers[0].moe
    assert blk.router_bias_E.dtype == torch.float32 and blk.router.weight.dtype == torch.bfloat16
    blk.update_router_bias(torch.tensor([9, 1, 1, 1, 1, 1, 1, 1]))
    model(torch.randint(0, 512, (1, 8)))


def test_end_step_balance_without_group_is_local():
    model = SigmaMoEForCausalLM(_cfg(router_bias_update="aux_free", bias_update_rate=0.5))
    c = torch.tensor([[4.0, 0, 0, 0, 0, 0, 0, 4], [1.0] * 8], dtype=torch.float64)
    out = model.end_step_balance(c, update_bias=False)
    assert torch.equal(out, c) and not model.layers[0].moe.router_bias_E.any()
    model.end_step_balance(c)
    assert model.layers[0].moe.router_bias_E.tolist() == [-0.5] + [0.5] * 6 + [-0.5]
    assert not model.layers[1].moe.router_bias_E.any()  # even load: sign(0) = 0


# --------------------------------------------------------------------------- sequence loss


def test_sequence_loss_matches_hand_computation():
    cfg, layer, x = _layer_and_x(1, (3, 7), lb_loss_type="sequence", router_topk=2)
    _, stats = layer(x)
    E, want = cfg.num_experts, []
    for b in range(3):
        p = torch.softmax(x[b] @ layer.router.weight.T, dim=-1)  # [S, E]
        top = p.topk(2, dim=-1).indices
        f = torch.bincount(top.reshape(-1), minlength=E).float() / top.numel()
        want.append(E * (f * p.mean(0)).sum())
    assert float(stats.lb_loss.detach()) == pytest.approx(
        float(torch.stack(want).detach().mean()), rel=1e-5
    )
    # it differs from the micro-batch loss over the 3 sequences together
    layer.lb_loss_type = "micro_batch"
    assert float(layer(x)[1].lb_loss.detach()) != pytest.approx(
        float(stats.lb_loss.detach()), rel=1e-4
    )
    stats.lb_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- shared experts


def test_shared_experts_match_hand_built_reference():
    torch.manual_seed(2)
    plain = SigmaMoELayer(_cfg(), 1)
    torch.manual_seed(2)
    shared = SigmaMoELayer(_cfg(num_shared_experts=2), 1)
    assert torch.equal(plain.router.weight, shared.router.weight)
    x = torch.randn(2, 6, 64)
    y0, _ = plain(x)
    y1, _ = shared(x)
    F_ = 32
    s = shared.shared
    ref = sum(
        _swiglu(
            x,
            s.w_gate_DF[:, j * F_ : (j + 1) * F_],
            s.w_up_DF[:, j * F_ : (j + 1) * F_],
            s.w_down_FD[j * F_ : (j + 1) * F_],
        )
        for j in range(2)
    )
    assert float(ref.detach().abs().max()) > 1e-4
    assert torch.allclose(y1, y0 + ref, atol=1e-6)
    y1.sum().backward()
    assert all(getattr(p, "allreduce", True) for p in s.parameters())  # dense, not expert


def test_shared_experts_counted_in_active_params_and_flops():
    a, b = _cfg(), _cfg(num_shared_experts=2)
    per = 2 * 3 * 64 * 32 * 2  # 2 layers × 2 shared × 3·D·F
    assert b.num_active_params() - a.num_active_params() == per
    assert b.num_params() - a.num_params() == per
    assert b.flops_per_token(64) - a.flops_per_token(64) == 6 * per
    n = sum(p.numel() for p in SigmaMoEForCausalLM(b).parameters())
    assert n == b.num_params()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.lb_loss_type=batch", "model.lb_loss_type"),
        ("model.router_bias_update=bias", "model.router_bias_update"),
        ("model.bias_update_rate=-0.001", "model.bias_update_rate"),
        ("model.num_shared_experts=-1", "model.num_shared_experts"),
    ],
)
def test_bad_balancing_keys_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(TINY, [override])


def test_ep_size_that_does_not_fit_names_shared_experts():
    with pytest.raises(ValueError, match="ep_size.*routed experts only.*2 shared"):
        _cfg(num_experts=6, ep_size=4, num_shared_experts=2)
    with pytest.raises(ValueError, match="bias_update_rate"):
        _cfg(bias_update_rate=-1.0)


# --------------------------------------------------------------------------- telemetry


def test_balance_metrics_by_hand():
    counts = torch.tensor([[4.0, 4, 4, 4], [16.0, 0, 0, 0]], dtype=torch.float64)
    m = balance_metrics(counts, torch.tensor([0.9, 0.1], dtype=torch.float64), [1, 2])
    assert m["expert_load_max/0"] == 1.0 and m["expert_load_cv/0"] == 0.0
    assert m["expert_load_entropy/0"] == pytest.approx(1.0)
    assert m["expert_idle_frac/0"] == 0.0 and m["expert_idle_frac/1"] == 0.75
    assert m["expert_load_max/1"] == 4.0 and m["expert_load_cv/1"] == pytest.approx(math.sqrt(3))
    assert m["expert_load_entropy/1"] == 0.0 and m["router_entropy/1"] == pytest.approx(0.1)
    assert m["topk/1"] == 2


# --------------------------------------------------------------------------- training + resume


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _bias(run: Path, step: int) -> torch.Tensor:
    st = torch.load(
        run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )["module"]
    return torch.stack([st[f"layers.{i}.moe.router_bias_E"] for i in range(2)])


class _StartStep:
    step = None

    def on_train_start(self, trainer):
        self.step = trainer.state.step


BIAS = ["model.router_bias_update=aux_free", "model.lb_loss_type=none", "train.max_steps=5"]


def test_aux_free_run_logs_balance_and_resumes_bitwise(tmp_path):
    """Bias updated every step (sign steps of the rate), saved, and a resume from step 2
    reproduces the uninterrupted run's losses and biases bitwise."""
    cfg = ckpt_config(*BIAS)
    train_in_process(cfg, tmp_path / "a")
    rows = _train_rows(tmp_path / "a")
    for key in ("expert_load_cv/1", "expert_load_entropy/0", "expert_idle_frac/1"):
        assert all(key in r for r in rows), key
    assert all(0 < r["router_entropy/0"] <= 1 for r in rows)
    b5 = _bias(tmp_path / "a", 5)
    rate = cfg.model.bias_update_rate
    steps = b5 / rate  # 5 steps of -1, 0 or +1 each
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 5
    assert steps.abs().sum() > 0

    run_b = tmp_path / "b"
    train_in_process(ckpt_config(*BIAS[:2], "train.max_steps=2"), run_b)
    start = _StartStep()
    train_in_process(ckpt_config(*BIAS), run_b, resume="auto", extra_callbacks=[start])
    assert start.step == 2  # it really resumed
    assert losses(run_b) == losses(tmp_path / "a")
    assert torch.equal(_bias(run_b, 5), b5)


def test_biasless_checkpoint_into_biased_run_is_refused_unless_asked(tmp_path):
    run = tmp_path / "r"
    train_in_process(ckpt_config("train.max_steps=2"), run)
    with pytest.raises(ValueError, match="router_bias_start_zero"):
        train_in_process(ckpt_config(*BIAS[:1], "train.max_steps=3"), run, resume="auto")
    train_in_process(
        ckpt_config(*BIAS[:1], "train.max_steps=3", "model.router_bias_start_zero=true"),
        run,
        resume="auto",
    )
    assert _bias(run, 3).abs().max() <= cfg_rate() + 1e-9  # one step from zero
    # and a biased checkpoint into a bias-less run
    with pytest.raises(ValueError, match="router_bias_update='none'"):
        train_in_process(ckpt_config("train.max_steps=4"), run, resume="auto")


def cfg_rate() -> float:
    return ckpt_config().model.bias_update_rate


def test_bias_survives_a_reshaped_resume(tmp_path):
    """Another ZeRO stage takes the reshape path (parameters copied one by one): the bias, a
    buffer without optimizer state, must be carried too."""
    run = tmp_path / "r"
    train_in_process(ckpt_config(*BIAS[:2], "train.max_steps=2"), run)
    b2 = _bias(run, 2)
    assert b2.abs().sum() > 0
    train_in_process(
        ckpt_config(*BIAS[:2], "train.max_steps=3", "parallel.zero_stage=2"), run, resume="auto"
    )
    step = (_bias(run, 3) - b2).abs()
    assert step.max() <= cfg_rate() + 1e-9  # one update on top of the restored bias


def test_shared_experts_are_in_dense_optimizer_groups():
    from sigma_moe.parallel.wiring import moe_param_groups

    model = SigmaMoEForCausalLM(_cfg(num_shared_experts=1))
    shared = {id(p) for blk in model.layers for p in blk.moe.shared.parameters()}
    groups = moe_param_groups(model, 0.1)
    dense = {id(p) for g in groups if not g.get("moe") for p in g["params"]}
    expert = {id(p) for g in groups if g.get("moe") for p in g["params"]}
    assert shared <= dense and not shared & expert and expert
