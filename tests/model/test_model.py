"""Model: shapes, parameter counts, router semantics, the balance loss against a hand computation."""

import math

import pytest
import torch

import sigma_moe_kernels as K
from sigma_moe.model import SigmaMoEConfig, SigmaMoEForCausalLM
from sigma_moe.model.moe import SigmaMoELayer


def test_sigma_moe_tiny_param_counts_on_meta_device():
    cfg = SigmaMoEConfig.preset("sigma-moe-tiny")
    # The report: 20B total, 0.5B activated (embeddings and LM head excluded).
    assert 19.5e9 < cfg.num_params() < 20.5e9
    assert 0.52e9 < cfg.num_active_params() < 0.56e9
    with torch.device("meta"):  # builds the real module tree, allocates nothing
        model = SigmaMoEForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert model.layers[0].moe.experts.w_gate_EDF.shape == (96, 1536, 768)
    assert model.layers[0].attn.k_proj.weight.shape == (4 * 96, 1536)


def test_real_model_matches_count():
    cfg = SigmaMoEConfig.preset("test-tiny")
    model = SigmaMoEForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_forward_shapes_and_loss():
    cfg = SigmaMoEConfig.preset("test-tiny")
    model = SigmaMoEForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (3, 17, cfg.vocab_size)
    assert out.loss_per_token.shape == (3, 17)
    assert torch.all(out.loss_per_token[:, :5] == 0)
    # Untrained: CE close to log(V).
    assert out.loss_per_token[:, 5:].mean().item() == pytest.approx(
        math.log(cfg.vocab_size), rel=0.05
    )
    assert set(out.aux_losses) == {"lb_loss", "z_loss"}
    (out.loss_per_token.sum() + sum(out.aux_losses.values())).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_router_top1_gate_is_probability_and_learns_from_lm_loss():
    """Sigma-MoE-Tiny: k=1 without renormalisation, so the gate is the softmax probability and
    the router gets gradient from the LM loss alone (lb and z coefficients zero)."""
    cfg = SigmaMoEConfig.preset("test-tiny", lb_coeff=0.0, z_loss_coeff=0.0)
    model = SigmaMoEForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    out = model(ids, labels=ids)
    out.loss_per_token.mean().backward()
    g = model.layers[0].moe.router.weight.grad
    assert g is not None and g.abs().sum() > 0
    logits = torch.randn(5, 8)
    w, e, _, _ = K.topk_route(logits, 1)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(w[:, 0], probs.max(-1).values)
    assert torch.equal(e[:, 0], probs.argmax(-1))


def test_balance_loss_hand_computation():
    cfg = SigmaMoEConfig.preset(
        "test-tiny", num_experts=4, router_topk=1, lb_loss_type="micro_batch"
    )
    layer = SigmaMoELayer(cfg, 0)
    # Four tokens: routed to experts 0, 0, 1, 3 with known probabilities.
    probs = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]
    )
    logits = probs.log()
    w, e, counts, prob_sum = K.topk_route(logits, 1)
    assert counts.tolist() == [2, 1, 0, 1]
    f = torch.tensor([2, 1, 0, 1]) / 4
    p = probs.mean(0)
    expected = 4 * (f * p).sum()  # N_E * sum_i f_i p_i
    got = layer._balance_loss(counts, prob_sum, 4)
    torch.testing.assert_close(got, expected)
    assert got.item() == pytest.approx(4 * (0.5 * 0.4 + 0.25 * 0.25 + 0 + 0.25 * 0.175))


def test_per_layer_topk_and_schedule():
    from sigma_moe.config import TopkPhase
    from sigma_moe.train.engine import topk_for_step

    cfg = SigmaMoEConfig.preset("test-tiny", router_topk=[4, 1])
    model = SigmaMoEForCausalLM(cfg)
    assert model.current_topk() == [4, 1]
    sched = [
        TopkPhase(until_step=10, layers=[0, 1], topk=8),
        TopkPhase(until_step=20, layers=[0], topk=2),
    ]
    assert topk_for_step([1, 1], sched, 0) == [8, 8]
    assert topk_for_step([1, 1], sched, 10) == [2, 1]
    assert topk_for_step([1, 1], sched, 20) == [1, 1]
    model.set_topk([8, 8])
    out = model(torch.randint(0, cfg.vocab_size, (1, 6)))
    assert [s.topk for s in out.moe_stats] == [8, 8]
    with pytest.raises(ValueError, match="top-k 9"):
        model.set_topk([9, 1])


def test_capacity_factor_drops_and_counts():
    cfg = SigmaMoEConfig.preset("test-tiny", capacity_factor=0.5)
    model = SigmaMoEForCausalLM(cfg)
    out = model(torch.randint(0, cfg.vocab_size, (2, 32)))
    # capacity ceil(0.5 * 64 / 8) = 4 per expert: at most 32 of 64 tokens kept per layer.
    assert all(s.dropped_tokens >= 32 for s in out.moe_stats)


def test_ep_invariant_expert_init():
    full = SigmaMoEForCausalLM(SigmaMoEConfig.preset("test-tiny"))
    half = SigmaMoEForCausalLM(SigmaMoEConfig.preset("test-tiny", ep_size=2), ep_rank=1)
    a = full.layers[1].moe.experts.w_gate_EDF[4:]
    b = half.layers[1].moe.experts.w_gate_EDF
    assert torch.equal(a, b)
