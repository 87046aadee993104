"""generate_and_score: one prefill per prompt gives the generations of ``generate_from_ids`` and the gold
rows of ``score_records``.

float64 on the tiny model (see tests/test_generation.py's module docstring): the generated ids must be
identical, and every per-token value of the rows equal to the separate passes' within 1e-9. The two paths
compute the same math with differently shaped matmuls (a prompt prefill plus the gold tokens on its cache,
against one full forward over prompt + gold), ~1e3 rounding steps of 1.1e-16 on values below ~20: < 1e-11,
so 1e-9 is two orders above the noise, and far below what a wrong position, mask or off-by-one moves
(> 1e-3 on this model)."""
from __future__ import annotations

import pytest
import torch

from percontrast.options import DecodingOptions

BOUND = 1e-9


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from helpers import write_records

    from percontrast.datasets import load_records
    from percontrast.encoding import PromptBuilder
    from percontrast.models import load_model
    from percontrast.prompts import get_task

    model, tok = load_model("tiny-random")
    task = get_task("generic")
    recs = load_records(str(write_records(tmp_path_factory.mktemp("d") / "r.jsonl", n=9)), task)
    return model.double().eval(), tok, recs, PromptBuilder(tok, task, k=2)


@pytest.mark.parametrize("ngram,chunk", [(0, None), (2, None), (2, 2)])
def test_one_prefill_gives_the_separate_passes(setup, ngram, chunk, monkeypatch):
    """chunk 2: each generation batch of 4 prefilled 2 rows at a time (PREFILL_CHUNK), merged into one cache."""
    import percontrast.generation as G
    from percontrast.commands.score import generate_and_score_records, score_records
    from percontrast.generation import generate_from_ids

    model, tok, recs, builder = setup
    opts = DecodingOptions(max_new_tokens=10, no_repeat_ngram_size=ngram, batch_size=4)
    info_a, info_b = [], []
    with monkeypatch.context() as mp:
        if chunk:
            mp.setattr(G, "PREFILL_CHUNK", chunk)
        texts, rows = generate_and_score_records(model, tok, recs, builder, opts, batch_size=4, progress=False,
                                                 info=info_a)
    prompts = [builder.encode(r, with_response=False)["prompt_with"] for r in recs]
    assert prompts == [builder.encode(r)["prompt_with"] for r in recs]   # the prompts both paths build
    ref_texts = generate_from_ids(model, tok, prompts, opts, 4, progress=False, info=info_b)
    ref_rows = score_records(model, tok, recs, builder, batch_size=4, progress=False)
    assert texts == ref_texts and info_a == info_b
    assert len({len(r["token_ids"]) for r in rows}) > 3 and len({len(p) for p in prompts}) > 3   # real padding
    for a, b in zip(rows, ref_rows):
        assert a["id"] == b["id"] and a["token_ids"] == b["token_ids"] and a["tokens"] == b["tokens"]
        for key in ("logp_with", "logp_without", "pir", "entropy", "weights"):
            assert torch.allclose(torch.tensor(a[key]), torch.tensor(b[key]), rtol=0, atol=BOUND), key


def test_refuses_what_it_cannot_share(setup):
    from percontrast.generation import generate_and_score, shares_prefill

    model, tok, recs, builder = setup
    for opts in (DecodingOptions(contrast_alpha=1.0), DecodingOptions(do_sample=True)):
        assert not shares_prefill(model, opts)
        with pytest.raises(ValueError, match="plain greedy"):
            generate_and_score(model, tok, [builder.encode(recs[0])], opts)
    assert shares_prefill(model, DecodingOptions())


def test_auto_batch_size_is_the_memory_budget(setup):
    """batch_size 0: per row the KV cache, 3 float32 logit copies and 4 copies of the widest activation,
    within a quarter of the free memory, capped; checked against the hand computation for the tiny model."""
    from percontrast.generation import AUTO_BATCH_CAP, auto_batch_size

    model, *_ = setup
    c = model.config
    kv = c.num_key_value_heads or c.num_attention_heads
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_row = (c.num_hidden_layers * 2 * kv * head * 100 * 8 + 3 * 10 * c.vocab_size * 4
               + 4 * 100 * max(c.intermediate_size, c.hidden_size) * 8)   # float64 model: 8 bytes
    assert auto_batch_size(model, 100, 10, free_bytes=4 * 7 * per_row) == 7
    assert auto_batch_size(model, 100, 10, rows_per_example=2, free_bytes=4 * 7 * per_row) == 3
    assert auto_batch_size(model, 100, 10, free_bytes=1) == 1
    assert auto_batch_size(model, 100, 10, free_bytes=1 << 50) == AUTO_BATCH_CAP
    from percontrast.generation import CPU_SCORE_BATCH_CAP, score_batch_cap
    assert score_batch_cap(model) == CPU_SCORE_BATCH_CAP       # the tiny model is on the CPU
    assert auto_batch_size(model, 100, 10, free_bytes=1 << 50, cap=CPU_SCORE_BATCH_CAP) == CPU_SCORE_BATCH_CAP
    assert auto_batch_size(model, 100, 10, free_bytes=4 * 7 * per_row, cap=CPU_SCORE_BATCH_CAP) == 7


def test_batch_size_zero_decodes_and_scores_like_a_fixed_batch(setup):
    from percontrast.commands.score import score_records
    from percontrast.generation import generate_from_ids

    model, tok, recs, builder = setup
    prompts = [builder.encode(r, with_response=False)["prompt_with"] for r in recs]
    auto = generate_from_ids(model, tok, prompts, DecodingOptions(max_new_tokens=6, batch_size=0), progress=False)
    fixed = generate_from_ids(model, tok, prompts, DecodingOptions(max_new_tokens=6, batch_size=3), progress=False)
    assert auto == fixed
    a = score_records(model, tok, recs, builder, batch_size=0, progress=False)
    b = score_records(model, tok, recs, builder, batch_size=3, progress=False)
    for ra, rb in zip(a, b):
        assert torch.allclose(torch.tensor(ra["pir"]), torch.tensor(rb["pir"]), rtol=0, atol=BOUND)
