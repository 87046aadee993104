"""Profile-contrastive decoding: s(v) = log p(v | profile, x) + alpha * [log p(v | profile, x) - log p(v | x)].

Exactness as in test_generation.py: float64 models, and every chosen token is checked (on an independent,
unpadded, uncached recomputation) to lead the runner-up by more than MARGIN, so an id difference is a bug,
never float noise. The tiny model's weights are scaled x5 (head untied) so that it does not repeat one token.
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


@pytest.mark.parametrize("guard", [0.0, 0.1])
def test_batched_equals_one_at_a_time(model_tok, guard):
    """Padded batches of 2B rows (both prompts of every row, different lengths) equal each pair alone."""
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
    with pytest.raises(UserError):
        DecodingOptions(contrast_alpha=1, repetition_penalty=1.2)
    with pytest.raises(UserError):
        DecodingOptions(contrast_plausibility=2)
    assert math.isclose(DecodingOptions().contrast_plausibility, 0.1)


def test_eval_and_generate_take_the_flags(tmp_path):
    from helpers import run_cli
    common = ["--model", "tiny-random", "--data", "builtin:sample-test", "--task", "email", "--limit", "3",
              "--max-new-tokens", "3", "--contrast-alpha", "0.5"]
    rc, _, err = run_cli(["eval", *common, "--output-dir", str(tmp_path / "e")])
    assert rc == 0, err
    rc, _, err = run_cli(["generate", *common, "--contrast-plausibility", "0.2", "--output-dir", str(tmp_path / "g")])
    assert rc == 0, err
    rc, _, err = run_cli(["eval", *common, "--no-profile", "--output-dir", str(tmp_path / "n")])
    assert rc == 2 and err.startswith("error:") and err.count("\n") == 1 and "--no-profile" in err


def test_no_profile_flag_really_sets_no_profile():
    """argparse's BooleanOptionalAction reads any --no-... flag as False, so --no-profile used to leave
    no_profile False and eval silently generated WITH the profile."""
    from percontrast.cli import build_parser
    assert build_parser().parse_args(["eval", "--data", "x", "--no-profile"]).no_profile is True
    assert build_parser().parse_args(["generate", "--data", "x", "--no-profile"]).no_profile is True
    assert build_parser().parse_args(["train", "--data", "x", "--no-progress"]).progress is False
