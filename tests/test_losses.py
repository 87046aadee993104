"""The losses as pure functions: hand-written sums, edge cases, stop-gradient."""
import math

import pytest
import torch

from percontrast.losses import (LOSSES, ce_loss, clip_weights, entce_loss, jsd_loss, lossce_loss, perce_loss,
                                relative_jsd, threshold_loss, weighted_nll)
from percontrast.pir import js_divergence


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(2, 4, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return logp.requires_grad_(), mask


def test_ce_is_mean_nll_over_response_tokens():
    logp, mask = _data()
    want = -(logp[0, :3].sum() + logp[1, :2].sum()) / 5
    torch.testing.assert_close(ce_loss(logp, mask), want)


def test_perce_matches_hand_weighted_sum_when_pir_inside_clip():
    logp, mask = _data()
    pir = torch.tensor([[1.0, 2.5, 4.9, 100.0], [0.9, 3.0, -7.0, 0.0]])  # padded slots may hold anything
    want = -(1.0 * logp[0, 0] + 2.5 * logp[0, 1] + 4.9 * logp[0, 2] + 0.9 * logp[1, 0] + 3.0 * logp[1, 1]) / 5
    torch.testing.assert_close(perce_loss(logp, mask, pir=pir), want)


def test_perce_clips_to_m_and_M():
    logp, mask = _data()
    pir = torch.tensor([[-3.0, 9.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    w = torch.tensor([[0.8, 5.0, 1.0, 0.8], [0.8, 0.8, 0.8, 0.8]])
    want = -(w * logp * mask).sum() / 5
    torch.testing.assert_close(perce_loss(logp, mask, pir=pir), want)


def test_perce_with_unit_clip_equals_ce():
    logp, mask = _data()
    pir = torch.randn(2, 4) * 5
    torch.testing.assert_close(perce_loss(logp, mask, pir=pir, clip_min=1.0, clip_max=1.0), ce_loss(logp, mask))


def test_weights_normalization_divides_by_weight_sum():
    logp, mask = _data()
    pir = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 1.0, 0.0, 0.0]])
    want = -(pir * logp * mask).sum() / (pir * mask).sum()
    torch.testing.assert_close(perce_loss(logp, mask, pir=pir, normalize="weights"), want)


def test_num_items_overrides_token_count():
    logp, mask = _data()
    torch.testing.assert_close(ce_loss(logp, mask, num_items=10), -(logp * mask).sum() / 10)


@pytest.mark.parametrize("method", ["perce", "lossce", "entce", "jsd", "threshold"])
def test_no_gradient_flows_through_weights(method):
    # The signal is built from a tensor that requires grad; the weight must still be constant.
    logp, mask = _data()
    signal_src = torch.randn(2, 4, requires_grad=True)
    kw = {"perce": {"pir": signal_src * 2}, "entce": {"entropy": signal_src.abs() * 2}, "lossce": {},
          "jsd": {"jsd": signal_src.abs()}, "threshold": {"pir": signal_src * 2}}[method]
    loss = LOSSES[method](logp, mask, **kw)
    loss.backward()
    assert signal_src.grad is None
    # d loss / d logp_i must be exactly -w_i / n with w held constant
    if method == "lossce":
        w = clip_weights(-logp, 0.8, 5.0)
    elif method == "jsd":
        w = clip_weights(relative_jsd(kw["jsd"], mask), 0.8, 5.0)
    elif method == "threshold":
        w = torch.where(kw["pir"] > math.log(2), 5.0, 0.8)
    else:
        w = clip_weights(next(iter(kw.values())), 0.8, 5.0)
    torch.testing.assert_close(logp.grad, -(w * mask) / 5)


def test_clip_weights_detached():
    x = torch.randn(3, requires_grad=True)
    assert not clip_weights(x * 3, 0.8, 5.0).requires_grad


def test_lossce_and_entce_use_their_signal():
    logp, mask = _data()
    ent = torch.full((2, 4), 2.0)
    torch.testing.assert_close(entce_loss(logp, mask, entropy=ent), 2.0 * ce_loss(logp, mask))
    w = (-logp.detach()).clamp(0.8, 5.0)
    torch.testing.assert_close(lossce_loss(logp, mask), -(w * logp * mask).sum() / 5)


def test_unknown_normalization_rejected():
    logp, mask = _data()
    with pytest.raises(ValueError):
        weighted_nll(logp, torch.ones_like(logp), mask, normalize="bogus")


def test_js_divergence_hand_values():
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); JS = [KL(p||m) + KL(q||m)] / 2, by hand.
    p = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    q = torch.tensor([1.0, 0.0], dtype=torch.float64).log()          # log 0 = -inf: a zero-probability token
    want = (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25) + math.log(1 / 0.75)) / 2
    got = js_divergence(p[None], q[None])
    assert abs(got.item() - want) < 1e-15 * 8                          # a few float64 roundings of O(1) terms
    assert js_divergence(q[None], p[None]).item() == got.item()        # symmetric (same operations, swapped)
    assert js_divergence(p[None], p[None]).item() == 0.0
    disjoint = js_divergence(torch.tensor([[0.0, -math.inf]], dtype=torch.float64),
                             torch.tensor([[-math.inf, 0.0]], dtype=torch.float64))
    assert abs(disjoint.item() - math.log(2)) < 1e-15 * 8              # the maximum, ln 2


def test_jsd_loss_weights_are_clipped_relative_divergence():
    logp, mask = _data()
    jsd = torch.tensor([[0.01, 0.02, 0.30, 9.0], [0.001, 0.05, 7.0, 7.0]], dtype=logp.dtype)
    mean = (0.01 + 0.02 + 0.30 + 0.001 + 0.05) / 5                    # real tokens only
    w = (jsd / mean).clamp(0.8, 5.0)
    want = -(w * logp * mask).sum() / 5
    torch.testing.assert_close(jsd_loss(logp, mask, jsd=jsd), want)


def test_threshold_loss_is_two_level():
    logp, mask = _data()
    pir = torch.tensor([[0.7, 0.6931, 2.0, 9.0], [-3.0, 0.70, 9.0, 9.0]])
    w = torch.tensor([[4.0, 1.0, 4.0, 0.0], [1.0, 4.0, 0.0, 0.0]])     # margin ln 2 = 0.693147...: 0.6931 is below
    want = -(w * logp * mask).sum() / 5
    torch.testing.assert_close(threshold_loss(logp, mask, pir=pir, clip_min=1.0, clip_max=4.0), want)
    w_half = torch.where(pir > 0.5, 4.0, 1.0)
    torch.testing.assert_close(threshold_loss(logp, mask, pir=pir, clip_min=1.0, clip_max=4.0, margin=0.5),
                               -(w_half * logp * mask).sum() / 5)
