"""The domain × expert matrix of a forward sums to each layer's token counts."""

from __future__ import annotations

import numpy as np
import torch

from sigma_moe.config import RunConfig
from sigma_moe.model import SigmaMoEForCausalLM
from sigma_moe.train.domain_stats import domain_expert_counts, plot_expert_load


def test_domain_expert_matrix_sums_to_the_layer_counts(tmp_path):
    cfg = RunConfig()
    cfg.model.preset = "test-tiny"
    cfg.model.router_topk = [2, 1]
    cfg.validate()
    torch.manual_seed(0)
    model = SigmaMoEForCausalLM(cfg.build_model(512)).eval()
    B, S = 5, 16
    ids = torch.randint(0, 512, (B, S))
    domain_B = torch.tensor([2, 0, 2, 1, 0])
    with torch.no_grad():
        out = model(ids, labels=ids)
    c_LKE = domain_expert_counts(out.moe_stats, domain_B, num_domains=4)
    assert c_LKE.shape[:2] == (len(out.moe_stats), 4)
    for li, s in enumerate(out.moe_stats):
        assert torch.equal(c_LKE[li].sum(0), s.tokens_per_expert_E.double())
        k = s.experts_TK.shape[1]
        per_domain = c_LKE[li].sum(1)
        assert per_domain.tolist() == [2 * S * k, 1 * S * k, 2 * S * k, 0]
    plot_expert_load(c_LKE.numpy(), list("abcd"), tmp_path / "h.png", "t")
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert np.isfinite(c_LKE.numpy()).all()
