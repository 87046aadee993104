"""Run a model on collated pairs: response log-probs, PIR, entropy.

The fast path (used in training and scoring):

* ``response_logits`` puts only the R response-predicting positions through the LM head
  (``logits_to_keep`` with the index window [P-1, P-1+R), which ``pad_aligned`` makes the
  same for every row), so the [B, L, V] prompt logits are never materialized.
* ``token_logprobs`` gathers the target logit and subtracts a logsumexp: no log-softmax
  copy of the logits is kept.
* ``counterfactual_logp`` is the E-step: one separate, top-level forward on the
  profile-free input at its own (shorter) length, under ``torch.no_grad`` so no autograd
  state is kept. transformers >= 5 skips gradient checkpointing when grad is disabled
  (``GradientCheckpointingLayer`` checks ``torch.is_grad_enabled()``), so nothing is
  recomputed or wrapped; ``_no_checkpointing`` switches it off anyway, in case a model's
  layers do not follow that rule. A separate top-level call also matters under
  DeepSpeed ZeRO-3 / FSDP. The with-profile log-probs are NOT recomputed: the caller
  passes the detached ones from the training forward.
* ``score_batch(..., top_k=N)`` also keeps the N most likely next tokens of both
  distributions (``top_candidates``), taken from the logits the two passes already
  have: no third forward. Each pass's [B, R, V] logits are reduced to what is kept
  (log-probs, entropy, the top N) and dropped before the next pass runs, so the two
  passes' logits are never held together, with or without top-k.

The naive path (``naive_*``) is the textbook implementation, kept as the reference the
fast path is tested against and as the benchmark's baseline: full forwards with logits
at every position, a full log-softmax, then the response window sliced out.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .pir import pir as pir_fn
from .pir import token_entropy, token_logprobs, upcast


def response_logits(model, input_ids, attention_mask, position_ids, resp_start, n_resp: int) -> torch.Tensor:
    """Logits [B, R, V] at the positions that predict the response tokens (only those hit the LM head)."""
    start = int(resp_start) - 1
    keep = torch.arange(start, start + n_resp, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=keep, use_cache=False)
    return out.logits


def with_profile_logits(model, batch: dict) -> torch.Tensor:
    return response_logits(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                           batch["resp_start"], batch["response_ids"].shape[1])


@contextmanager
def _no_checkpointing(model):
    """Temporarily turn gradient checkpointing off on every layer that has the flag."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


@torch.no_grad()
def response_nll(model, batch: dict) -> tuple[float, float]:
    """(sum of -log p(y_i | profile, x, y_<i) over the real response tokens, their count); no grad."""
    logp = token_logprobs(with_profile_logits(model, batch), batch["response_ids"])
    mask = batch["response_mask"].to(logp.dtype)
    return float(-(logp * mask).sum()), float(mask.sum())


def counterfactual_response_logits(model, batch: dict) -> torch.Tensor:
    """Logits [B, R, V] of the profile-free pass at the response-predicting positions, with grad
    (NextQuill's auxiliary term trains through it); ``counterfactual_logits`` is the E-step's."""
    return response_logits(model, batch["cf_input_ids"], batch["cf_attention_mask"],
                           batch["cf_position_ids"], batch["cf_resp_start"], batch["response_ids"].shape[1])


@torch.no_grad()
def counterfactual_logits(model, batch: dict) -> torch.Tensor:
    """Logits [B, R, V] of the profile-free pass at the response-predicting positions, no autograd state."""
    with _no_checkpointing(model):
        return counterfactual_response_logits(model, batch)


@torch.no_grad()
def counterfactual_logp(model, batch: dict) -> torch.Tensor:
    """log p(y_i | x, y_<i) with the profile removed, [B, R], no autograd state."""
    return token_logprobs(counterfactual_logits(model, batch), batch["response_ids"])


def top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely next tokens at each position: (probabilities [B, R, k], token ids
    [B, R, k]), highest first. softmax = exp(logit - logsumexp), on the top k only (fp32 at least)."""
    logits = upcast(logits)
    k = min(int(k), logits.shape[-1])
    vals, ids = logits.topk(k, dim=-1, sorted=True)
    return (vals - torch.logsumexp(logits, dim=-1, keepdim=True)).exp(), ids


# ----------------------------------------------------------------------------- naive reference
def naive_response_logp(model, input_ids, attention_mask, position_ids, resp_start,
                        targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, R], logits [B, R, V]) the textbook way: logits at all L positions,
    a full log-softmax over them, then the response window. Same numbers as the fast path."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    logp_all = torch.log_softmax(upcast(out.logits), dim=-1)             # [B, L, V]
    start, R = int(resp_start) - 1, targets.shape[1]
    logp = logp_all[:, start:start + R].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, out.logits[:, start:start + R]


def naive_with_profile_logp(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return naive_response_logp(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                               batch["resp_start"], batch["response_ids"])


@torch.no_grad()
def naive_counterfactual_logp(model, batch: dict) -> torch.Tensor:
    """The E-step the naive way (full logits over the profile-free sequence); still no grad."""
    return naive_response_logp(model, batch["cf_input_ids"], batch["cf_attention_mask"], batch["cf_position_ids"],
                               batch["cf_resp_start"], batch["response_ids"])[0]


def naive_counterfactual_response_logits(model, batch: dict) -> torch.Tensor:
    """Profile-free logits [B, R, V] the naive way, with grad."""
    return naive_response_logp(model, batch["cf_input_ids"], batch["cf_attention_mask"], batch["cf_position_ids"],
                               batch["cf_resp_start"], batch["response_ids"])[1]


@torch.no_grad()
def naive_counterfactual_logits(model, batch: dict) -> torch.Tensor:
    """Profile-free logits [B, R, V] the naive way (jsd's E-step)."""
    return naive_counterfactual_response_logits(model, batch)


@dataclass
class PairScores:
    """Per-token scores of one batch, each [B, R]; ``mask`` marks real response tokens.
    ``top_with`` / ``top_without``: (probabilities, token ids), each [B, R, k], highest first,
    of the with-profile and the profile-free next-token distributions (``score_batch(top_k=k)``)."""
    logp_with: torch.Tensor
    logp_without: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor
    top_with: tuple[torch.Tensor, torch.Tensor] | None = None
    top_without: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def pir(self) -> torch.Tensor:
        return pir_fn(self.logp_with, self.logp_without)


@torch.no_grad()
def score_batch(model, batch: dict, top_k: int = 0) -> PairScores:
    """Both passes without gradient: everything PerContrast and the heatmaps need; with ``top_k``
    > 0 also the top-k candidates of both distributions (from the same two passes)."""
    targets = batch["response_ids"]
    logits = with_profile_logits(model, batch)
    logp_with, entropy = token_logprobs(logits, targets), token_entropy(logits)
    top_with = top_candidates(logits, top_k) if top_k > 0 else None
    del logits                      # one pass's [B, R, V] logits alive at a time
    logits = counterfactual_logits(model, batch)
    logp_without = token_logprobs(logits, targets)
    top_without = top_candidates(logits, top_k) if top_k > 0 else None
    del logits
    return PairScores(logp_with=logp_with, logp_without=logp_without, entropy=entropy,
                      mask=batch["response_mask"], top_with=top_with, top_without=top_without)
