"""Token-weighted cross-entropy losses: ``ce``, ``perce``, ``lossce``, ``entce``, ``jsd``, ``threshold``,
``nextquill``, ``dft`` (``docs/baselines.md`` says which are faithful reproductions and which are ours).

All take per-token log-probs ``logp`` [B, R] of the gold response tokens under the
with-profile prompt, and a 0/1 ``mask`` [B, R] of real response positions. The clipped
weighted losses share one rule and differ only in the signal that is clipped:

    w_i = clip(signal_i, m, M)   (detached: a constant for autograd)
    L   = sum_i w_i * -logp_i / n

``signal`` is PIR (PerCE, the paper), the token's own NLL (LossCE, Rho-1 flavour),
the predictive entropy (EntCE), or one of two NextQuill-style signals (arXiv 2506.02368
weights tokens by the causal effect of the user history; these are our two readings of it,
not that paper's code): ``jsd``, the Jensen-Shannon divergence between the with-profile and
profile-free next-token distributions divided by its mean over the micro-batch's response
tokens (JS lies in [0, ln 2], below any sensible clip floor; relative to its mean it says
"k times the typical shift", so the same clip applies), and ``threshold``, the clip's upper
end M where PIR > margin (the profile multiplied the gold token's probability by more than
e^margin) and its lower end m elsewhere. ``n`` is the number of response tokens (``"tokens"``,
the paper's -1/n sum) or the sum of weights (``"weights"``). Under gradient
accumulation / several processes ``num_items`` is the response-token count of the
whole optimizer step, so that micro-batch losses add up to the full-batch loss.

Two peer methods with fixed weights of their own (no clip, no ``normalize`` choice):

- ``nextquill``: NextQuill as its released code trains (github.com/juntaoyou/NextQuill, ``train.py``,
  ``CustomTrainer3``, commit f095446df600efdd9e7b88f0467b3d702a6731ff, unchanged at HEAD
  0c3a1788c07f932f777a114f3e57094788f9fe3e): weight 0.9 where the profile raised the gold token's
  *probability* by more than 0.05 (p_with - p_without > 0.05), 0.1 elsewhere, divided by the sum of
  the weights, plus 0.1 x the cross-entropy of the difference logits z_with - z_without.
- ``dft``: Dynamic Fine-Tuning (arXiv 2508.05629) as TRL 1.16 computes it (``SFTTrainer``,
  ``loss_type="dft"``): -p(y_i) * log p(y_i) with p detached, over the response tokens.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

Normalize = Literal["tokens", "weights"]
METHODS = ("ce", "lossce", "entce", "perce", "jsd", "threshold", "nextquill", "dft")   # the one list; tables use this order
# Methods whose weights need the profile-free forward (the E-step) every step.
CONTRAST_METHODS = ("perce", "jsd", "threshold", "nextquill")
# Methods whose weights are clip(signal, m, M): ce has no weights, nextquill and dft have fixed ones.
CLIPPED_METHODS = ("lossce", "entce", "perce", "jsd", "threshold")

# NextQuill's constants, as its released code has them (train.py, CustomTrainer3; see the module docstring).
# The margin is on the probability difference p_with - p_without, not on log-probs (PIR).
NEXTQUILL_MARGIN = 0.05
NEXTQUILL_HIGH, NEXTQUILL_LOW = 0.9, 0.1
NEXTQUILL_ALPHA = 0.1     # CustomTrainer3's default; train.py constructs it without alpha


def clip_weights(signal: torch.Tensor, clip_min: float, clip_max: float) -> torch.Tensor:
    """clip(signal, m, M), detached. A gradient through w would reward raising the signal itself."""
    return signal.detach().clamp(min=clip_min, max=clip_max)


def weighted_nll(logp: torch.Tensor, weights: torch.Tensor | None, mask: torch.Tensor,
                 normalize: Normalize = "tokens", num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """sum(w * -logp * mask) / n. ``weights=None`` means all ones (plain CE)."""
    mask = mask.to(logp.dtype)
    w = mask if weights is None else weights.to(logp.dtype) * mask
    total = -(w * logp).sum()
    n_tokens = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=logp.dtype,
                                                                      device=logp.device)
    if normalize == "tokens" or weights is None:
        return total / n_tokens.clamp(min=1)
    if normalize == "weights":
        # Sum of weights over the optimizer step is unknown inside one micro-batch; we use
        # (mean weight of this micro-batch) x (token count of the step). Exact with one micro-batch.
        mean_w = w.sum() / mask.sum().clamp(min=1)
        return total / (mean_w * n_tokens).clamp(min=1e-12)
    raise ValueError(f"normalize must be 'tokens' or 'weights', got {normalize!r}")


def ce_loss(logp, mask, num_items=None, **_):
    """Plain cross-entropy over response tokens (the baseline)."""
    return weighted_nll(logp, None, mask, num_items=num_items)


def perce_loss(logp, mask, pir, clip_min=0.8, clip_max=5.0, normalize: Normalize = "tokens",
               num_items=None, **_):
    """PerCE: CE weighted by clip(PIR, m, M), the paper's loss."""
    return weighted_nll(logp, clip_weights(pir, clip_min, clip_max), mask, normalize, num_items)


def lossce_loss(logp, mask, clip_min=0.8, clip_max=5.0, normalize: Normalize = "tokens",
                num_items=None, token_loss=None, **_):
    """LossCE: weight from the current model's own detached token loss (``token_loss``, default
    -logp; the trainer passes a dropout-free one when the training forward had dropout)."""
    signal = -logp if token_loss is None else token_loss
    return weighted_nll(logp, clip_weights(signal, clip_min, clip_max), mask, normalize, num_items)


def entce_loss(logp, mask, entropy, clip_min=0.8, clip_max=5.0, normalize: Normalize = "tokens",
               num_items=None, **_):
    """EntCE: weight from the detached predictive entropy (nats) at the position."""
    return weighted_nll(logp, clip_weights(entropy, clip_min, clip_max), mask, normalize, num_items)


def relative_jsd(jsd: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """JS divergence over its mean on the real response tokens (mean 1 before clipping; detached)."""
    m = mask.to(jsd.dtype)
    mean = (jsd.detach() * m).sum() / m.sum().clamp(min=1)
    return jsd.detach() / mean.clamp(min=torch.finfo(jsd.dtype).tiny)


def threshold_weights(pir: torch.Tensor, margin: float, low: float, high: float) -> torch.Tensor:
    """``high`` where PIR > margin, ``low`` elsewhere (detached)."""
    pir = pir.detach()
    return torch.where(pir > margin, torch.full_like(pir, high), torch.full_like(pir, low))


def jsd_loss(logp, mask, jsd, clip_min=0.8, clip_max=5.0, normalize: Normalize = "tokens", num_items=None, **_):
    """NextQuill-style (ours): CE weighted by clip(JS / mean JS, m, M)."""
    return weighted_nll(logp, clip_weights(relative_jsd(jsd, mask), clip_min, clip_max), mask, normalize, num_items)


def threshold_loss(logp, mask, pir, clip_min=0.8, clip_max=5.0, normalize: Normalize = "tokens", num_items=None,
                   margin: float = math.log(2.0), **_):
    """NextQuill-style (ours): weight M on tokens whose PIR exceeds ``margin``, m on the rest."""
    return weighted_nll(logp, threshold_weights(pir, margin, clip_min, clip_max), mask, normalize, num_items)


def probability_gain(logp_with: torch.Tensor, logp_without: torch.Tensor) -> torch.Tensor:
    """p(y_i | profile, x, y_<i) - p(y_i | x, y_<i): NextQuill's per-token signal (a probability
    difference in [-1, 1], where PIR is a log-ratio)."""
    return logp_with.exp() - logp_without.exp()


def nextquill_weights(prob_gain: torch.Tensor, margin: float = NEXTQUILL_MARGIN, high: float = NEXTQUILL_HIGH,
                      low: float = NEXTQUILL_LOW) -> torch.Tensor:
    """``high`` where the probability gain exceeds ``margin`` (strictly, as their ``p1 - p2 > threshold``),
    ``low`` elsewhere; detached. Not yet normalized: ``nextquill_loss`` divides by their sum."""
    g = prob_gain.detach()
    return torch.where(g > margin, torch.full_like(g, high), torch.full_like(g, low))


def nextquill_loss(logp, mask, prob_gain, diff_logp, num_items=None, margin: float = NEXTQUILL_MARGIN,
                   high: float = NEXTQUILL_HIGH, low: float = NEXTQUILL_LOW, alpha: float = NEXTQUILL_ALPHA, **_):
    """NextQuill (its released code): sum_i w_i * -logp_i / sum_i w_i + alpha * mean_i -diff_logp_i.

    ``w`` = ``nextquill_weights(prob_gain)``; ``diff_logp`` [B, R] is log softmax(z_with - z_without)[y_i],
    the log-prob of the gold token under the difference of the two prompts' logits, with gradient
    through both forwards (their auxiliary term). Their code normalizes each micro-batch by its own
    weight sum and takes the auxiliary CE as a micro-batch mean; with ``num_items`` (the step's token
    count) both become step-level like every loss here: the same numbers with one micro-batch per step."""
    weighted = weighted_nll(logp, nextquill_weights(prob_gain, margin, high, low), mask, "weights", num_items)
    if alpha == 0:
        return weighted
    return weighted + alpha * weighted_nll(diff_logp, None, mask, num_items=num_items)


def dft_loss(logp, mask, num_items=None, **_):
    """DFT, as TRL's ``loss_type="dft"``: sum_i p_i * -logp_i / n with p_i = exp(logp_i) detached (the
    gradient is p times CE's, and none flows through p) and n the response tokens (TRL's num_tokens)."""
    return weighted_nll(logp, logp.detach().exp(), mask, "tokens", num_items)


LOSSES = {"ce": ce_loss, "perce": perce_loss, "lossce": lossce_loss, "entce": entce_loss,
          "jsd": jsd_loss, "threshold": threshold_loss, "nextquill": nextquill_loss, "dft": dft_loss}
