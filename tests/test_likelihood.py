"""likelihood.py: personal-token sets fixed once, per-example and token-weighted corpus values by hand."""
import math

import pytest

from percontrast.likelihood import example_likelihood, personal_positions, summarize_likelihood


def _row(id_, logp, pir, toks=None):
    return {"id": id_, "logp_with": logp, "pir": pir, "token_ids": toks or list(range(len(logp)))}


def test_personal_set_comes_from_the_base_rows_and_is_reused():
    base = [_row("a", [-1.0, -2.0, -3.0], [0.9, 0.8, 2.0]), _row("b", [-1.0], [0.1])]
    personal = personal_positions(base)
    assert personal["a"]["positions"] == [0, 2]            # strictly above 0.8
    assert personal["b"]["positions"] == []
    # a trained model's row: other log-probs and PIR, but the SAME positions count as personal
    trained = _row("a", [-0.5, -4.0, -1.0], [-1.0, 3.0, 0.0])
    e = example_likelihood(trained, personal["a"])
    assert e["nll_personal"] == (0.5 + 1.0) / 2 and e["nll_other"] == 4.0
    assert e["nll"] == 5.5 / 3 and e["mean_pir"] == 2.0 / 3
    eb = example_likelihood(_row("b", [-2.0], [0.3]), personal["b"])
    assert eb["nll_personal"] is None and eb["nll_other"] == 2.0
    s = summarize_likelihood([e, eb])
    # token-weighted: (0.5 + 4 + 1 + 2) / 4 tokens; personal: (0.5 + 1) / 2; other: (4 + 2) / 2
    assert s["nll"] == 7.5 / 4 and s["nll_personal"] == 0.75 and s["nll_other"] == 3.0
    assert s["personal_tokens"] == 2 and s["share_personal"] == 0.5 and s["mean_pir"] == (2.0 + 0.3) / 4


def test_other_gold_tokens_are_refused():
    personal = personal_positions([_row("a", [-1.0, -1.0], [1.0, 1.0], toks=[5, 6])])
    with pytest.raises(ValueError, match="gold tokens differ"):
        example_likelihood(_row("a", [-1.0, -1.0], [1.0, 1.0], toks=[5, 7]), personal["a"])


def test_no_personal_token_anywhere_gives_nan_not_a_crash():
    personal = personal_positions([_row("a", [-1.0], [0.0])])
    s = summarize_likelihood([example_likelihood(_row("a", [-1.0], [0.0]), personal["a"])])
    assert math.isnan(s["nll_personal"]) and s["nll_other"] == 1.0
