"""The online mixers' updates against hand-computed examples, their invariants (a distribution
above the floor), the deterministic allocation and the state round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sigma_moe.mixing.online import DoReMiSampler, Exp3Sampler, apply_floor
from sigma_moe.train.sampling import DomainLosses, SamplerError, StaticSampler


def _losses(ce, tok, excess=None) -> DomainLosses:
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    ex = excess is not None
    return DomainLosses(t(ce), t(tok), t(excess if ex else [0.0] * len(ce)), has_ref=ex)


def test_doremi_update_by_hand():
    s = DoReMiSampler(["a", "b"], 4, [0.5, 0.5], 1, 0.05, lr=1.0, smoothing=0.1)
    # domain a: Σ max(ℓθ − ℓref, 0) = 2 over 4 tokens → λ = 0.5; b: 0 over 2 tokens → λ = 0
    s.feedback(0, _losses([9.0, 3.0], [4.0, 2.0], [2.0, 0.0]))
    ea = math.exp(0.5)
    alpha = [0.9 * ea / (ea + 1) + 0.05, 0.9 * 1 / (ea + 1) + 0.05]  # 0.61021, 0.38979
    assert s.alpha == pytest.approx(alpha, abs=1e-12)
    assert s.weights() == pytest.approx([0.05 + 0.9 * a for a in alpha], abs=1e-12)
    assert s.weights() == pytest.approx([0.599192, 0.400808], abs=1e-6)
    # a second step multiplies onto the smoothed α (Algorithm 1 of DoReMi)
    s.feedback(1, _losses([1.0, 1.0], [1.0, 1.0], [0.0, 1.0]))
    a2 = np.array(alpha) * np.exp([0.0, 1.0])
    a2 = 0.9 * a2 / a2.sum() + 0.05
    assert s.alpha == pytest.approx(a2, abs=1e-12)


def test_doremi_accumulates_over_update_every():
    s = DoReMiSampler(["a", "b"], 4, [0.5, 0.5], 2, 0.0, lr=2.0, smoothing=0.0)
    s.feedback(0, _losses([1.0, 1.0], [2.0, 0.0], [1.0, 0.0]))
    assert s.weights() == [0.5, 0.5]  # no update before update_every steps
    s.feedback(1, _losses([1.0, 1.0], [2.0, 4.0], [1.0, 2.0]))
    lam = [2.0 / 4.0, 2.0 / 4.0]  # sums over both steps: equal excess → weights unchanged
    assert lam[0] == lam[1]
    assert s.weights() == pytest.approx([0.5, 0.5], abs=1e-12)


def test_doremi_without_reference_losses_is_an_error():
    s = DoReMiSampler(["a", "b"], 4, [0.5, 0.5], 1, 0.0)
    with pytest.raises(SamplerError, match="reference"):
        s.feedback(0, _losses([1.0, 1.0], [1.0, 1.0]))


def test_exp3_update_by_hand():
    s = Exp3Sampler(["a", "b"], 4, 1, 0.0, reward="loss", alpha=0.5)
    assert s.weights() == [0.5, 0.5]
    s.feedback(0, _losses([4.0, 2.0], [2.0, 2.0]))  # mean CE 2 and 1
    # R̂ = 0.5·0 + 0.5·L/π = [2, 1]; ε1 = min(1/2, sqrt(ln2/2)) = 0.5, ε2 = sqrt(ln2/4)
    assert s.R == pytest.approx([2.0, 1.0])
    e2 = math.sqrt(math.log(2) / 4)
    sm = [math.exp(1.0) / (math.exp(1.0) + math.exp(0.5))]
    sm.append(1 - sm[0])
    pi = [(1 - 2 * e2) * p + e2 for p in sm]
    assert s.weights() == pytest.approx(pi, abs=1e-12)
    assert s.weights() == pytest.approx([0.520505, 0.479495], abs=1e-6)
    # a domain not read keeps its reward estimate
    s.feedback(1, _losses([3.0, 0.0], [1.0, 0.0]))
    assert s.R[1] == 1.0 and s.R[0] == pytest.approx(0.5 * 2.0 + 0.5 * 3.0 / pi[0])


def test_exp3_loss_decrease_reward():
    s = Exp3Sampler(["a", "b"], 4, 1, 0.0, reward="loss_decrease", alpha=0.5)
    s.feedback(0, _losses([2.0, 1.0], [1.0, 1.0]))  # no previous loss: no reward yet
    assert s.R.tolist() == [0.0, 0.0] and s.weights() == pytest.approx([0.5, 0.5])
    s.feedback(1, _losses([1.5, 1.0], [1.0, 1.0]))
    assert s.R == pytest.approx([0.5 * 0.5 / 0.5, 0.0])


@pytest.mark.parametrize("kind", ["doremi", "bandit"])
def test_weights_stay_a_distribution_above_the_floor(kind):
    rng = np.random.default_rng(0)
    K, floor = 5, 0.03
    names = list("abcde")
    if kind == "doremi":
        s = DoReMiSampler(names, 8, [0.6, 0.1, 0.1, 0.1, 0.1], 1, floor, lr=5.0, smoothing=0.0)
    else:
        s = Exp3Sampler(names, 8, 1, floor)
    for step in range(300):
        s.keys_for_step(step)
        tok = rng.integers(0, 3, K).astype(float) * 10
        ce = tok * rng.uniform(0, 20, K)
        s.feedback(step, _losses(ce, tok, ce * rng.uniform(0, 1, K)))
        w = np.array(s.weights())
        assert abs(w.sum() - 1) < 1e-12 and w.min() >= floor - 1e-15, (step, w)
    assert apply_floor(np.array([1.0, 0, 0, 0, 0]), 0.2).tolist() == [0.2] * 5


def test_allocation_is_deterministic_and_tracks_the_weights():
    s = DoReMiSampler(["a", "b"], 4, [0.75, 0.25], 1, 0.0)
    # deficits (target − assigned) per slot: [.75,.25] → a; [.5,.5] tie → a; [.25,.75] → b; a
    first = [(0, 0), (0, 1), (1, 0), (0, 2)]
    assert s.keys_for_step(0) == first
    assert s.keys_for_step(0) == first  # the same step again
    keys = first + [k for st in range(1, 50) for k in s.keys_for_step(st)]
    n_a = sum(d == 0 for d, _ in keys)
    assert abs(n_a - 0.75 * len(keys)) <= 1
    # every domain's samples are read in order, none twice
    for d in (0, 1):
        idx = [i for dd, i in keys if dd == d]
        assert idx == list(range(len(idx)))
    with pytest.raises(SamplerError, match="in order"):
        s.keys_for_step(70)


def test_upcoming_keys_are_the_next_steps_keys_until_an_update():
    s = DoReMiSampler(["a", "b", "c"], 4, [0.5, 0.3, 0.2], 3, 0.0, lr=1.0, smoothing=0.0)
    s.keys_for_step(0)
    s.feedback(0, _losses([4.0, 4.0, 4.0], [8.0, 4.0, 4.0], [2.0, 0.0, 0.0]))
    state = s.state_dict()
    plan = s.upcoming_keys(8)  # steps 1 and 2: the weights change only after step 2
    assert s.state_dict() == state  # the plan does not move the sampler
    # by hand: after step 0 a: 2 read, b: 1, c: 1, deficits carried over (ties to the lower id)
    assert plan[:4] == [(0, 2), (1, 1), (0, 3), (2, 1)]
    assert s.keys_for_step(1) + s.keys_for_step(2) == plan
    # after the update at step 2 the new weights (domain a raised) decide the plan
    s.feedback(1, _losses([4.0, 4.0, 4.0], [8.0, 4.0, 4.0], [2.0, 0.0, 0.0]))
    s.feedback(2, _losses([4.0, 4.0, 4.0], [8.0, 4.0, 4.0], [2.0, 0.0, 0.0]))
    assert s.weights()[0] > 0.5
    assert s.upcoming_keys(4) == s.keys_for_step(3)


@pytest.mark.parametrize("cls", [DoReMiSampler, Exp3Sampler])
def test_state_round_trip_continues_exactly(cls):
    def make():
        if cls is DoReMiSampler:
            return DoReMiSampler(list("abc"), 6, [0.2, 0.3, 0.5], 2, 0.01)
        return Exp3Sampler(list("abc"), 6, 2, 0.01)

    rng = np.random.default_rng(1)
    feed = [(rng.uniform(1, 9, 3), rng.uniform(1, 5, 3)) for _ in range(12)]
    a, b = make(), make()
    for st in range(5):
        a.keys_for_step(st)
        a.feedback(st, _losses(feed[st][0], [4.0] * 3, feed[st][1]))
    b.load_state_dict(a.state_dict())
    for st in range(5, 12):
        assert a.keys_for_step(st) == b.keys_for_step(st)
        for s in (a, b):
            s.feedback(st, _losses(feed[st][0], [4.0] * 3, feed[st][1]))
        assert a.weights() == b.weights()


def test_checkpoint_of_other_domains_is_refused():
    a = Exp3Sampler(["prose", "code"], 4)
    b = Exp3Sampler(["prose", "math"], 4)
    with pytest.raises(SamplerError, match=r"\['prose', 'code'\].*\['prose', 'math'\]"):
        b.load_state_dict(a.state_dict())
    d = DoReMiSampler(["prose", "code"], 4, [0.5, 0.5])
    with pytest.raises(SamplerError, match="data.mixing.kind"):
        d.load_state_dict(a.state_dict())


def test_static_sampler_reads_the_blend_order():
    class DS:
        domain_names = ["a", "b"]

        def domain_and_index(self, i):
            return (i % 2, i // 2)

    s = StaticSampler(DS(), 4)
    assert s.keys_for_step(3) == [(0, 6), (1, 6), (0, 7), (1, 7)]
    assert s.weights() is None and not s.online
