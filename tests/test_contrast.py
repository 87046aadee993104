"""Profile-contrastive decoding: s(v) = log p(v | profile, x) + alpha * [log p(v | profile, x) - log p(v | x)].

Exactness as in test_generation.py: float64 models, and every chosen token is checked (on an independent,
unpadded, uncached recomputation) to lead the runner-up by more than MARGIN, so an id difference is a bug,
never float noise. The tiny model's weights are scaled x5 (head untied) so that it does not repeat one token.

Also here: ``contrast_counterfactual="swap"`` (another user's profile as the counterfactual), the n-gram ban in
the contrast loop, and the explain trace (the plain greedy pick at every step of a contrastive output).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from percontrast.generation import DecodingOptions, contrast_scores, generate_from_ids

MARGIN = 1e-6
N_NEW = 12


@pytest.fixture(scope="module")
def model_tok():
    from percontrast.models import load_model
    model, tok = load_model("tiny-random")
    model = copy.deepcopy(model).double().eval()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model, tok


def _pairs(tok):
    """(with-profile, profile-free) prompt pairs of different lengths."""
    texts = [("I live in Lisbon and cycle. Write about the weekend", "Write about the weekend"),
             ("vegetarian", "Plan dinner"),
             ("Profile: chess, violin, the tram 28, rainy Novembers in Porto. Write a note", "Write a note"),
             ("x", "y z")]
    return [(tok(a)["input_ids"], tok(b)["input_ids"]) for a, b in texts]


@torch.no_grad()
def _full_logits(model, prompt, cont):
    out = model(input_ids=torch.tensor([prompt + cont]), use_cache=False)
    return out.logits[0, len(prompt) - 1: len(prompt) - 1 + len(cont)]


def _assert_decisive(model, tok, pairs, outs, opts):
    """Each output is the contrastive greedy continuation by a full recomputation of both distributions,
    every winner leads by > MARGIN, and it passes the plausibility guard."""
    for (pw, po), o in zip(pairs, outs):
        cont = o + ([tok.eos_token_id] if len(o) < opts.max_new_tokens else [])
        lw, lo = _full_logits(model, pw, cont), _full_logits(model, po, cont)
        s = contrast_scores(lw, lo, opts.contrast_alpha, opts.contrast_plausibility)
        top2 = s.topk(2, dim=-1)
        assert top2.indices[:, 0].tolist() == cont
        assert (top2.values[:, 0] - top2.values[:, 1]).min().item() > MARGIN
        if opts.contrast_plausibility > 0:
            p = torch.softmax(lw, -1)
            chosen = p.gather(-1, torch.tensor(cont)[:, None]).squeeze(-1)
            assert (chosen >= opts.contrast_plausibility * p.max(-1).values - 1e-12).all()


def test_scores_are_the_formula():
    lw, lo = torch.randn(3, 11, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64)
    a = 0.7
    want = torch.log_softmax(lw, -1) * (1 + a) - a * torch.log_softmax(lo, -1)
    torch.testing.assert_close(contrast_scores(lw, lo, a, 0.0), want, rtol=0, atol=1e-12)
    guarded = contrast_scores(lw, lo, a, 0.5)
    p = torch.softmax(lw, -1)
    assert torch.equal(torch.isinf(guarded), p < 0.5 * p.max(-1, keepdim=True).values)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_equals_transformers_guidance_on_single_prompts(model_tok, alpha):
    """Guard off, one unpadded prompt: transformers' guidance_scale = 1 + alpha with the profile-free
    prompt as negative_prompt_ids gives the same tokens (its processor computes
    gamma * (log p_c - log p_u) + log p_u, which is our formula)."""
    model, tok = model_tok
    opts = DecodingOptions(max_new_tokens=N_NEW, contrast_alpha=alpha, contrast_plausibility=0.0)
    for pw, po in _pairs(tok):
        ours = generate_from_ids(model, tok, [pw], opts, contrast_prompts=[po], progress=False, return_ids=True)[0]
        hf = model.generate(input_ids=torch.tensor([pw]), negative_prompt_ids=torch.tensor([po]),
                            guidance_scale=1 + alpha, do_sample=False, max_new_tokens=N_NEW,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            temperature=None, top_p=None, top_k=None)[0, len(pw):].tolist()
        if tok.eos_token_id in hf:
            hf = hf[: hf.index(tok.eos_token_id)]
        assert ours == hf
        _assert_decisive(model, tok, [(pw, po)], [ours], opts)


@pytest.mark.parametrize("guard,chunk", [(0.0, None), (0.1, None), (0.1, 2)])
def test_batched_equals_one_at_a_time(model_tok, guard, chunk, monkeypatch):
    """Padded batches of 2B rows (both prompts of every row, different lengths) equal each pair alone;
    chunk 2: each half of a batch of 4 prefilled 2 rows at a time (PREFILL_CHUNK) before the merge."""
    import percontrast.generation as G
    if chunk:
        monkeypatch.setattr(G, "PREFILL_CHUNK", chunk)
    model, tok = model_tok
    pairs = _pairs(tok)
    opts = DecodingOptions(max_new_tokens=N_NEW, contrast_alpha=1.0, contrast_plausibility=guard)
    contrast = [po for _, po in pairs]
    batched = generate_from_ids(model, tok, [pw for pw, _ in pairs], opts, contrast_prompts=contrast,
                                batch_size=4, progress=False, return_ids=True)
    alone = [generate_from_ids(model, tok, [pw], opts, contrast_prompts=[po], progress=False, return_ids=True)[0]
             for pw, po in pairs]
    assert batched == alone
    _assert_decisive(model, tok, pairs, batched, opts)


def test_contrast_changes_the_output_and_alpha_zero_is_plain_greedy(model_tok):
    model, tok = model_tok
    pairs = _pairs(tok)
    plain = generate_from_ids(model, tok, [pw for pw, _ in pairs], DecodingOptions(max_new_tokens=N_NEW),
                              progress=False, return_ids=True)
    strong = generate_from_ids(model, tok, [pw for pw, _ in pairs],
                               DecodingOptions(max_new_tokens=N_NEW, contrast_alpha=3.0, contrast_plausibility=0.0),
                               contrast_prompts=[po for _, po in pairs], progress=False, return_ids=True)
    assert plain != strong


def test_sampling_is_seeded_and_respects_the_guard(model_tok):
    model, tok = model_tok
    pairs = _pairs(tok)
    opts = DecodingOptions(max_new_tokens=N_NEW, do_sample=True, temperature=1.5, contrast_alpha=1.0,
                           contrast_plausibility=0.2)
    run = lambda seed: generate_from_ids(model, tok, [pw for pw, _ in pairs], opts,  # noqa: E731
                                         contrast_prompts=[po for _, po in pairs], progress=False,
                                         return_ids=True, seed=seed)
    a, b = run(0), run(0)
    assert a == b                                   # same seed, same samples
    for (pw, po), o in zip(pairs, a):               # every sampled token passed the plausibility guard
        if o:
            p = torch.softmax(_full_logits(model, pw, o), -1)
            chosen = p.gather(-1, torch.tensor(o)[:, None]).squeeze(-1)
            assert (chosen >= 0.2 * p.max(-1).values - 1e-12).all()


def test_options_refuse_bad_combinations():
    from percontrast.errors import UserError
    with pytest.raises(UserError):
        DecodingOptions(contrast_alpha=-1)
    with pytest.raises(UserError, match="no_repeat_ngram_size"):
        DecodingOptions(no_repeat_ngram_size=-1)
    with pytest.raises(UserError, match="contrast_counterfactual"):
        DecodingOptions(contrast_counterfactual="other")
    with pytest.raises(UserError, match="--contrast-alpha"):      # swap without alpha would decode plainly
        DecodingOptions(contrast_counterfactual="swap").refuse_unused_contrast_options()
    DecodingOptions(contrast_counterfactual="swap")                # allowed as such: an alpha grid may include 0
    with pytest.raises(UserError):
        DecodingOptions(contrast_alpha=1, repetition_penalty=1.2)
    with pytest.raises(UserError):
        DecodingOptions(contrast_plausibility=2)
    assert math.isclose(DecodingOptions().contrast_plausibility, 0.1)


def test_eval_and_generate_take_the_flags(tmp_path):
    import json
    from helpers import run_cli
    common = ["--model", "tiny-random", "--data", "builtin:sample-test", "--task", "email", "--limit", "3",
              "--max-new-tokens", "3", "--contrast-alpha", "0.5"]
    rc, _, err = run_cli(["eval", *common, "--output-dir", str(tmp_path / "e")])
    assert rc == 0, err
    page = tmp_path / "g" / "explain.html"
    rc, out, err = run_cli(["generate", *common, "--contrast-plausibility", "0.2", "--contrast-counterfactual", "swap",
                            "--no-repeat-ngram-size", "2", "--explain", str(page), "--output-dir", str(tmp_path / "g")])
    assert rc == 0, err
    rows = [json.loads(line) for line in (tmp_path / "g" / "predictions.jsonl").read_text().splitlines()]
    assert [r["new_tokens"] for r in rows] == [3, 3, 3] and not any(r["ended"] for r in rows)  # stock: never ends
    html = page.read_text()
    assert "id='changed'" in html and "another user&#x27;s profile" in html and json.loads(out)["explain"] == str(page)

    def refused(argv, *words):
        rc, _, err = run_cli(argv)
        assert rc == 2 and err.startswith("error:") and err.count("\n") == 1 and all(w in err for w in words), err
    refused(["eval", *common, "--no-profile", "--output-dir", str(tmp_path / "n")], "--no-profile")
    plain = [a for a in common if a not in ("--contrast-alpha", "0.5")]
    refused(["eval", *plain, "--contrast-counterfactual", "swap", "--output-dir", str(tmp_path / "s")],
            "--contrast-alpha")
    refused(["generate", *plain, "--explain", str(tmp_path / "x.html"), "--output-dir", str(tmp_path / "x")],
            "--explain", "--contrast-alpha")
    refused(["generate", *common, "--do-sample", "--explain", str(tmp_path / "x.html"), "--output-dir",
             str(tmp_path / "x")], "--explain", "--do-sample")
    refused(["generate", *common, "--explain", str(page), "--output-dir", str(tmp_path / "g2")], "--overwrite")


def test_no_profile_flag_really_sets_no_profile():
    """argparse's BooleanOptionalAction reads any --no-... flag as False, so --no-profile used to leave
    no_profile False and eval silently generated WITH the profile."""
    from percontrast.cli import build_parser
    assert build_parser().parse_args(["eval", "--data", "x", "--no-profile"]).no_profile is True
    assert build_parser().parse_args(["generate", "--data", "x", "--no-profile"]).no_profile is True
    assert build_parser().parse_args(["train", "--data", "x", "--no-progress"]).progress is False


# -- the n-gram ban in the contrast loop ---------------------------------------------------------------------

def test_no_repeat_ngram_in_the_contrast_loop(model_tok):
    """Contrast + ban: batched == smaller batches / one at a time, and each output is, step by step on a full
    recomputation, the contrastive argmax among the tokens the ban leaves (the guard relative to the best of
    those), by a decisive margin; no output repeats a bigram, and at some step the unbanned winner was banned."""
    from percontrast.generation import NGramBan
    model, tok = model_tok
    pairs = _pairs(tok)
    kw = dict(max_new_tokens=N_NEW, contrast_alpha=1.0, contrast_plausibility=0.1)
    run = lambda opts, ps: generate_from_ids(model, tok, [pw for pw, _ in ps], opts,  # noqa: E731
                                             contrast_prompts=[po for _, po in ps], progress=False, return_ids=True)
    opts = DecodingOptions(**kw, no_repeat_ngram_size=2)
    batched = run(opts, pairs)
    assert batched == [run(opts, [pair])[0] for pair in pairs[:2]] + run(opts, pairs[2:])
    bit = 0
    for (pw, po), o in zip(pairs, batched):
        assert len(set(zip(o, o[1:]))) == len(o) - 1          # no bigram twice
        cont = o + ([tok.eos_token_id] if len(o) < N_NEW else [])
        lw, lo = _full_logits(model, pw, cont), _full_logits(model, po, cont)
        ban = NGramBan(2, 1)
        for t, tok_t in enumerate(cont):
            banned = sorted(ban.banned(0, cont[:t]))
            w = lw[t].clone()
            w[banned] = float("-inf")
            top2 = contrast_scores(w[None], lo[t][None], 1.0, 0.1)[0].topk(2)
            assert top2.indices[0].item() == tok_t and (top2.values[0] - top2.values[1]).item() > MARGIN
            bit += contrast_scores(lw[t][None], lo[t][None], 1.0, 0.1)[0].argmax().item() in banned
            ban.push(0, cont[:t + 1])
    assert bit >= 1        # without the ban, some step would have repeated a bigram


# -- the explain trace: what the contrast changed ----------------------------------------------------------------

def test_explain_trace_records_the_plain_greedy_pick(model_tok):
    """For every generated token, the recorded plain pick is the argmax of an independent full forward of the
    with-profile prompt + the same prefix (no cache, no padding), winning by > MARGIN, and the recorded
    log-probs are that forward's; alpha 3 changes at least one token, so "changed" is exercised."""
    model, tok = model_tok
    pairs = _pairs(tok)
    opts = DecodingOptions(max_new_tokens=N_NEW, contrast_alpha=3.0, contrast_plausibility=0.0)
    info = []
    outs = generate_from_ids(model, tok, [pw for pw, _ in pairs], opts, contrast_prompts=[po for _, po in pairs],
                             progress=False, return_ids=True, info=info, explain=True)
    changed = 0
    for (pw, po), o, inf in zip(pairs, outs, info):
        assert inf["token_ids"] == o and inf["new_tokens"] == len(o) and inf["ended"] == (len(o) < N_NEW)
        if not o:
            continue
        lw, lo = _full_logits(model, pw, o), _full_logits(model, po, o)
        top2 = lw.topk(2, dim=-1)
        assert inf["plain_ids"] == top2.indices[:, 0].tolist()
        assert (top2.values[:, 0] - top2.values[:, 1]).min().item() > MARGIN
        assert [c[0][0] for c in inf["top_with"]] == inf["plain_ids"]
        idx = torch.tensor(o)[:, None]
        # float64 logits of two evaluations differ by < 1e-12 (test_generation.py); log_softmax adds ~1e-15
        torch.testing.assert_close(torch.tensor(inf["logp_with"], dtype=torch.float64),
                                   torch.log_softmax(lw, -1).gather(-1, idx).squeeze(-1), rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.tensor(inf["logp_without"], dtype=torch.float64),
                                   torch.log_softmax(lo, -1).gather(-1, idx).squeeze(-1), rtol=0, atol=1e-10)
        changed += sum(a != b for a, b in zip(o, inf["plain_ids"]))
    assert changed >= 1
    plain = generate_from_ids(model, tok, [pairs[0][0]], DecodingOptions(max_new_tokens=N_NEW), progress=False,
                              return_ids=True)[0]
    assert plain[0] == info[0]["plain_ids"][0]          # the first step: same prefix, same pick as plain greedy
    with pytest.raises(ValueError):
        generate_from_ids(model, tok, [pairs[0][0]], DecodingOptions(max_new_tokens=2), progress=False, info=[],
                          explain=True)               # explain needs contrastive decoding


# -- swap: another user's profile as the counterfactual ------------------------------------------------------

@pytest.fixture(scope="module")
def email_records():
    from percontrast.datasets import load_records
    from percontrast.prompts import get_task
    return load_records("builtin:sample-test", get_task("email"))


def _builder(tok, seed=0):
    from percontrast.options import PromptOptions
    return PromptOptions(task="email", k=2, max_length=400, seed=seed).prompt_builder(tok, reserve_tokens=N_NEW)


def test_swap_contrast_prompt_holds_another_users_profile(model_tok, email_records, monkeypatch):
    """The second prompt of every row holds the items of the profile ``score --counterfactual swap`` picks
    (``other_user_profiles(records, --seed)``), a different user's, and none of the row's own; the choice
    follows the prompt seed, not the sampling seed."""
    import percontrast.generation as gen
    from percontrast.retrieval import other_user_profiles
    _, tok = model_tok
    seen = {}

    def spy(model, tokenizer, prompts, options, **kw):
        seen.update(prompts=prompts, contrast=kw["contrast_prompts"])
        return [""] * len(prompts)

    monkeypatch.setattr(gen, "generate_from_ids", spy)
    opts = DecodingOptions(max_new_tokens=N_NEW, contrast_alpha=1.0, contrast_counterfactual="swap")
    recs = email_records
    picks = {}
    for seed in (0, 1):
        builder = _builder(tok, seed)
        gen.generate_records(None, tok, recs, builder, opts, seed=7, progress=False)   # sampling seed 7: unused
        others = other_user_profiles(recs, seed)
        picks[seed] = [[it["text"] for it in o] for o in others]
        owner = {id(r["profile"]): r["user_id"] for r in recs}
        for r, other, pw, po in zip(recs, others, seen["prompts"], seen["contrast"]):
            assert owner[id(other)] != r["user_id"]
            text_w, text_o = tok.decode(pw), tok.decode(po)
            shown = builder.profile_items(r, other)
            assert shown and all(it["text"] in text_o for it in shown)
            assert not any(it["text"] in text_o for it in r["profile"])
            assert all(it["text"] in text_w for it in builder.profile_items(r))
            assert po == builder.encode(r, with_response=False, counterfactual_profile=other)["prompt_without"]
    assert picks[0] != picks[1]                                      # the seed decides
    remove = DecodingOptions(max_new_tokens=N_NEW, contrast_alpha=1.0)
    gen.generate_records(None, tok, recs, _builder(tok), remove, progress=False)
    assert not any(it["text"] in tok.decode(seen["contrast"][0]) for it in recs[0]["profile"])


def test_swap_changes_the_output(model_tok, email_records):
    """Real decoding through generate_records: each output is decisively the contrastive argmax against its
    own second prompt (the profile-free one, or the one with the other user's profile), swap and remove
    give different outputs at alpha 3, and at alpha 0 swap is plain decoding."""
    from percontrast.generation import generate_records
    from percontrast.retrieval import other_user_profiles
    model, tok = model_tok
    recs = email_records[::3][:4]
    builder = _builder(tok)
    others = other_user_profiles(recs, 0)
    outs = {}
    for cf in ("remove", "swap"):
        opts = DecodingOptions(max_new_tokens=8, contrast_alpha=3.0, contrast_plausibility=0.0,
                               contrast_counterfactual=cf)
        info = []
        texts = generate_records(model, tok, recs, builder, opts, progress=False, info=info, explain=True)
        outs[cf] = [i["token_ids"] for i in info]
        assert texts == [tok.decode(o, skip_special_tokens=True).strip() for o in outs[cf]]
        pairs = [(builder.encode(r, with_response=False)["prompt_with"],
                  builder.encode(r, with_response=False, counterfactual_profile=o if cf == "swap" else None)
                  ["prompt_without"]) for r, o in zip(recs, others)]
        _assert_decisive(model, tok, pairs, outs[cf], opts)
    assert outs["remove"] != outs["swap"]
    plain = DecodingOptions(max_new_tokens=8)
    zero = DecodingOptions(max_new_tokens=8, contrast_counterfactual="swap")
    assert generate_records(model, tok, recs, builder, zero, progress=False) == \
        generate_records(model, tok, recs, builder, plain, progress=False)


def test_swap_needs_two_users(model_tok, email_records):
    from percontrast.errors import UserError
    from percontrast.generation import generate_records
    model, tok = model_tok
    one_user = [r for r in email_records if r["user_id"] == email_records[0]["user_id"]]
    opts = DecodingOptions(max_new_tokens=2, contrast_alpha=1.0, contrast_counterfactual="swap")
    with pytest.raises(UserError, match="--contrast-counterfactual swap.*two users") as e:
        generate_records(model, tok, one_user, _builder(tok), opts, progress=False)
    assert "\n" not in str(e.value)
