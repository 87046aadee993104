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


def test_length_bucketed_scoring_equals_scoring_in_record_order(tmp_path):
    """score_records batches records of similar length together (less padding) and returns them in record
    order; every row's scores equal those of record-order batches. float64: padding is masked out and
    positions come from the mask, so the two differ only by the rounding of differently shaped matmuls
    (~1e3 rounding steps of 1.1e-16 on values below ~20 for this 2-layer, width-64 model: < 1e-11);
    the bound 1e-9 is two orders above that and far below any real error (a wrong mask or position
    moves log-probs by > 1e-3 here)."""
    import torch
    from helpers import write_records

    from percontrast.commands.score import score_records
    from percontrast.datasets import load_records
    from percontrast.encoding import PromptBuilder
    from percontrast.models import load_model
    from percontrast.prompts import get_task

    model, tok = load_model("tiny-random")
    model = model.double()
    task = get_task("generic")
    recs = load_records(str(write_records(tmp_path / "r.jsonl", n=9)), task)
    builder = PromptBuilder(tok, task, k=2)
    a = score_records(model, tok, recs, builder, batch_size=4, progress=False)
    b = score_records(model, tok, recs, builder, batch_size=4, progress=False, bucket=False)
    lens = [len(r["token_ids"]) for r in a]
    assert len(set(lens)) > 3                       # real length differences, so the batches really differ
    assert [r["id"] for r in a] == [r["id"] for r in b] == [r["id"] for r in recs]
    for ra, rb in zip(a, b):
        assert ra["token_ids"] == rb["token_ids"] and ra["tokens"] == rb["tokens"]
        for key in ("logp_with", "logp_without", "pir", "entropy"):
            assert torch.allclose(torch.tensor(ra[key]), torch.tensor(rb[key]), rtol=0, atol=1e-9), key
