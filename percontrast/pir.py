"""PerContrast: the personal influence ratio (PIR) of each response token.

    PIR_i = log p(y_i | profile, x, y_<i) - log p(y_i | x, y_<i)        (nats)

Both terms come from the same model on two prompts: the personalized one, and the
counterfactual without the profile items (by default without the task instruction that
refers to them too; see ``prompts.py``). The response ids are identical in both. Positive PIR: the profile made the
token more likely (a personal token). This module holds the pure tensor functions;
``scoring.py`` runs a model to get the two log-prob tensors.
"""
from __future__ import annotations

import math

import torch


def pir(logp_with: torch.Tensor, logp_without: torch.Tensor) -> torch.Tensor:
    """Personal influence ratio from two per-token log-prob tensors of the same shape."""
    if logp_with.shape != logp_without.shape:
        raise ValueError(f"shape mismatch: {tuple(logp_with.shape)} vs {tuple(logp_without.shape)}")
    return logp_with - logp_without


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, shape ``targets.shape``.

    Computed as ``logit[target] - logsumexp(logits)`` so that no second
    vocabulary-sized tensor (a full log-softmax) is materialized. Runs in fp32 at least
    (fp64 logits stay fp64, for exact checks).
    """
    logits = upcast(logits)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy (nats) of the next-token distribution at each position."""
    logp = torch.log_softmax(upcast(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between the two next-token distributions at
    each position: JS = (KL(p||m) + KL(q||m)) / 2 with m = (p + q) / 2. Unlike PIR it looks at the
    whole distribution, not at the gold token: how much the profile moved the prediction at all."""
    lp, lq = torch.log_softmax(upcast(logits_a), -1), torch.log_softmax(upcast(logits_b), -1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    # xlogy-style: a token with p = 0 contributes 0 (exp(-inf) * finite = 0, never nan)
    kl_pm = (lp.exp() * (lp - lm)).nan_to_num(0.0).sum(-1)
    kl_qm = (lq.exp() * (lq - lm)).nan_to_num(0.0).sum(-1)
    return ((kl_pm + kl_qm) / 2).clamp(min=0.0)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> fp32 (softmax sums in half precision lose digits); fp32 / fp64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
