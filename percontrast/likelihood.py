"""Likelihood metrics: what a model makes of the gold response, with no generation.

Cheap and low-noise beside ROUGE (one pair of forwards per example, no sampling, no decoding
choices). From the per-token rows of ``percontrast score`` (``logp_with``, ``pir``,
``token_ids``):

* ``nll``: NLL per token of the gold response with the profile in the prompt;
* ``mean_pir``: mean PIR of the gold tokens, i.e. how much this model leans on the profile;
* ``nll_personal`` / ``nll_other``: NLL per token on the *personal* tokens and on the rest;
* with a second token set (``specific``, e.g. ``specificity.specific_positions``: gold words
  specific to the user, defined by no model): ``nll_specific`` / ``nll_nonspecific`` likewise.

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


def _check_tokens(row: dict, token_set: dict, name: str) -> None:
    if list(row["token_ids"]) != list(token_set["token_ids"]):
        raise ValueError(f"example {row['id']}: gold tokens differ from those the {name}-token set was "
                         "fixed on (another tokenizer or prompt settings?)")


def example_likelihood(row: dict, personal: dict, specific: dict | None = None) -> dict:
    """Sums and counts of one example (so corpus values can be token-weighted) and its means.
    ``specific``: a second token set of the same shape (``specificity.specific_positions``); adds
    ``n_specific`` / ``nll_specific(_sum)`` and ``n_nonspecific`` / ``nll_nonspecific(_sum)``
    and leaves every other key as it is without it."""
    _check_tokens(row, personal, "personal")
    nll = [-x for x in row["logp_with"]]
    pos = set(personal["positions"])
    pers = [v for i, v in enumerate(nll) if i in pos]
    other = [v for i, v in enumerate(nll) if i not in pos]
    n = len(nll)
    out = {"n": n, "nll_sum": sum(nll), "pir_sum": sum(row["pir"]),
           "n_personal": len(pers), "nll_personal_sum": sum(pers),
           "n_other": len(other), "nll_other_sum": sum(other),
           "nll": sum(nll) / n if n else math.nan, "mean_pir": sum(row["pir"]) / n if n else math.nan,
           "nll_personal": sum(pers) / len(pers) if pers else None,
           "nll_other": sum(other) / len(other) if other else None}
    if specific is not None:
        _check_tokens(row, specific, "specific")
        spos = set(specific["positions"])
        spec = [v for i, v in enumerate(nll) if i in spos]
        rest = [v for i, v in enumerate(nll) if i not in spos]
        out.update({"n_specific": len(spec), "nll_specific_sum": sum(spec),
                    "n_nonspecific": len(rest), "nll_nonspecific_sum": sum(rest),
                    "nll_specific": sum(spec) / len(spec) if spec else None,
                    "nll_nonspecific": sum(rest) / len(rest) if rest else None})
    return out


def summarize_likelihood(examples: list[dict]) -> dict:
    """Token-weighted corpus values over ``example_likelihood`` results; ``nll_specific``,
    ``nll_nonspecific``, ``specific_tokens`` and ``share_specific`` too when every example was
    given the ``specific`` set."""
    def ratio(a, b):
        num, den = sum(e[a] for e in examples), sum(e[b] for e in examples)
        return num / den if den else math.nan
    n = sum(e["n"] for e in examples)
    out = {"nll": ratio("nll_sum", "n"), "mean_pir": ratio("pir_sum", "n"),
           "nll_personal": ratio("nll_personal_sum", "n_personal"), "nll_other": ratio("nll_other_sum", "n_other"),
           "tokens": n, "personal_tokens": sum(e["n_personal"] for e in examples),
           "share_personal": (sum(e["n_personal"] for e in examples) / n) if n else math.nan}
    with_specific = sum("n_specific" in e for e in examples)
    if with_specific and with_specific != len(examples):
        raise ValueError(f"{with_specific} of {len(examples)} examples have the specific-token set; "
                         "give it to every example_likelihood call or to none")
    if with_specific:
        n_spec = sum(e["n_specific"] for e in examples)
        out.update({"nll_specific": ratio("nll_specific_sum", "n_specific"),
                    "nll_nonspecific": ratio("nll_nonspecific_sum", "n_nonspecific"),
                    "specific_tokens": n_spec, "share_specific": n_spec / n if n else math.nan})
    return out
