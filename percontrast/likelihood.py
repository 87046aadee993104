"""Likelihood metrics: what a model makes of the gold response, with no generation.

Cheap and low-noise beside ROUGE (one pair of forwards per example, no sampling, no decoding
choices). From the per-token rows of ``percontrast score`` (``logp_with``, ``pir``,
``token_ids``):

* ``nll``: NLL per token of the gold response with the profile in the prompt;
* ``mean_pir``: mean PIR of the gold tokens, i.e. how much this model leans on the profile;
* ``nll_personal`` / ``nll_other``: NLL per token on the *personal* tokens and on the rest.

Personal tokens are fixed once, before any training, as the gold tokens to which the
untrained model gives PIR > ``PERSONAL_PIR`` (the clip floor, 0.8 nats): one token set for
every arm, so no arm defines its own target (``personal_positions``). A lower
``nll_personal`` after training means the model learned to predict what the profile
predicts; comparing it with ``nll_other`` says whether a method moved those tokens more.

Corpus values are token-weighted (sum of NLL over all tokens / number of tokens); the
per-example values (means over that example's tokens) are what paired intervals resample.
"""
from __future__ import annotations

import math

PERSONAL_PIR = 0.8


def personal_positions(base_rows: list[dict], threshold: float = PERSONAL_PIR) -> dict[str, dict]:
    """Per example id: the untrained model's personal-token positions and the token ids they
    index (so a later row with other tokens, e.g. another tokenizer, is refused, not misread)."""
    return {r["id"]: {"positions": [i for i, p in enumerate(r["pir"]) if p > threshold],
                      "token_ids": list(r["token_ids"])} for r in base_rows}


def example_likelihood(row: dict, personal: dict) -> dict:
    """Sums and counts of one example (so corpus values can be token-weighted) and its means."""
    if list(row["token_ids"]) != personal["token_ids"]:
        raise ValueError(f"example {row['id']}: gold tokens differ from those the personal-token set was "
                         "fixed on (another tokenizer or prompt settings?)")
    nll = [-x for x in row["logp_with"]]
    pos = set(personal["positions"])
    pers = [v for i, v in enumerate(nll) if i in pos]
    other = [v for i, v in enumerate(nll) if i not in pos]
    n = len(nll)
    return {"n": n, "nll_sum": sum(nll), "pir_sum": sum(row["pir"]),
            "n_personal": len(pers), "nll_personal_sum": sum(pers),
            "n_other": len(other), "nll_other_sum": sum(other),
            "nll": sum(nll) / n if n else math.nan, "mean_pir": sum(row["pir"]) / n if n else math.nan,
            "nll_personal": sum(pers) / len(pers) if pers else None,
            "nll_other": sum(other) / len(other) if other else None}


def summarize_likelihood(examples: list[dict]) -> dict:
    """Token-weighted corpus values over ``example_likelihood`` results."""
    def ratio(a, b):
        num, den = sum(e[a] for e in examples), sum(e[b] for e in examples)
        return num / den if den else math.nan
    n = sum(e["n"] for e in examples)
    return {"nll": ratio("nll_sum", "n"), "mean_pir": ratio("pir_sum", "n"),
            "nll_personal": ratio("nll_personal_sum", "n_personal"), "nll_other": ratio("nll_other_sum", "n_other"),
            "tokens": n, "personal_tokens": sum(e["n_personal"] for e in examples),
            "share_personal": (sum(e["n_personal"] for e in examples) / n) if n else math.nan}
