"""Batched greedy generation: exactly the one-at-a-time outputs, and exactly transformers' own ``generate``
on the same left-padded batches, for a rotary-position model (Llama) and an absolute-position one (GPT-2).

Exactness. Every comparison here is of token ids, i.e. of argmaxes over logits computed by different float
operations on the same math (a padded batch or a row alone, with or without the KV cache, our loop that drops
finished rows and keeps the LM head to the last position, or ``generate`` that keeps every row). Rounding can
only flip a token whose lead over the runner-up is below the rounding difference of the logits. So all models
are float64: the logits of this 2-layer, width-64 network are below 10 in magnitude and come out of ~10^3
rounding steps of 1.1e-16, so two evaluations differ by < 1e-12 (measured: 4e-16 .. 3e-15 between a padded
batch and each row alone; float32 gives 4e-7). And ``_assert_decisive`` checks, on an independent full
recomputation (no padding, no cache), that every chosen token leads the runner-up by more than MARGIN = 1e-6,
six orders of magnitude above that. Hence any difference in the ids is a real bug (positions, padding mask,
cache, row dropping, stopping), never float noise, on any machine.

Also here: ``no_repeat_ngram_size`` (the ban counts the generated tokens only, not the prompt; checked against
transformers' NoRepeatNGramLogitsProcessor on the generated tokens, on our loop, the model.generate path and
sampling), and the end info (``info``: new_tokens, ended) on both paths.
"""
from __future__ import annotations

import copy

import pytest
import torch

from percontrast.generation import DecodingOptions, generate_from_ids

MARGIN = 1e-6      # see the module docstring: > 1e6 x the float64 rounding difference of two evaluations
N_NEW = 16


@pytest.fixture(scope="module")
def tiny():
    """The library's tiny random Llama, as float64 (see the module docstring)."""
    from percontrast.models import load_model
    model, tok = load_model("tiny-random")
    return model.double().eval(), tok


def _prompts(tok, n=7):
    texts = ["Hi", "Write an email about the team dinner on Friday please",
             "Short", "A much longer prompt " * 12, "Subject: budget review for the third quarter",
             "ok", "Tell me about Lisbon and the tram line 28 on a rainy day in November"]
    return [tok(t)["input_ids"] for t in texts[:n]]


@torch.no_grad()
def _step_logits(model, prompt, cont):
    """Logits [len(cont), V] that predict each token of ``cont`` after ``prompt``: one full forward, no padding,
    no cache (an independent computation)."""
    out = model(input_ids=torch.tensor([prompt + cont]), use_cache=False)
    return out.logits[0, len(prompt) - 1: len(prompt) - 1 + len(cont)]


def _assert_decisive(model, tok, prompts, outs, n_new):
    """Each output is the greedy continuation (incl. the EOS that ended it, if it ended before n_new) by a full
    recomputation, and every step's winner leads by > MARGIN, so no rounding difference can flip it."""
    for p, o in zip(prompts, outs):
        cont = o + ([tok.eos_token_id] if len(o) < n_new else [])
        top2 = _step_logits(model, p, cont).topk(2, dim=-1)
        assert top2.indices[:, 0].tolist() == cont
        lead = (top2.values[:, 0] - top2.values[:, 1]).min().item()
        assert lead > MARGIN, f"near-tie ({lead:.2e}): a float difference could flip this token"


def _assert_no_special_tokens(tok, outs):
    """generate stops here at EOS only; our loop may stop at more ids (the chat template's end of turn, the
    generation config's EOS list), all of them special tokens. None occurs in these outputs, so the two stop
    sets act the same on them."""
    specials = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert not specials & {t for o in outs for t in o}


def test_batched_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) > 3  # really different lengths -> real left padding
    opts = DecodingOptions(max_new_tokens=12)
    single = [generate_from_ids(model, tok, [p], opts, batch_size=1, progress=False, return_ids=True)[0]
              for p in prompts]
    _assert_decisive(model, tok, prompts, single, 12)
    for bs in (3, 16):
        batched = generate_from_ids(model, tok, prompts, opts, batch_size=bs, progress=False, return_ids=True)
        assert batched == single, f"batch_size={bs}"
    assert any(len(s) > 0 for s in single)


def test_chunked_prefill_equals_one_at_a_time(tiny, monkeypatch):
    """A decoding batch larger than PREFILL_CHUNK is prefilled chunk by chunk, each chunk at its own padded
    length, and merged into one cache (zeros where a shorter chunk had no column, masked): the tokens are
    those of one prompt at a time, and the merged cache is laid out as a joint prefill's would be."""
    import percontrast.generation as G

    model, tok = tiny
    prompts = sorted(_prompts(tok), key=len, reverse=True)   # as generate_from_ids orders a batch
    opts = DecodingOptions(max_new_tokens=12)
    single = [generate_from_ids(model, tok, [p], opts, batch_size=1, progress=False, return_ids=True)[0]
              for p in prompts]
    _assert_decisive(model, tok, prompts, single, 12)
    monkeypatch.setattr(G, "PREFILL_CHUNK", 2)
    chunks = []
    real = G._merge_prefills
    monkeypatch.setattr(G, "_merge_prefills", lambda m, parts, n: chunks.append([p[1].shape for p in parts])
                        or real(m, parts, n))
    batched = generate_from_ids(model, tok, prompts, opts, batch_size=16, progress=False, return_ids=True)
    assert batched == single
    assert len(chunks[0]) == -(-len(prompts) // 2) and len({s[1] for s in chunks[0]}) > 1   # own lengths
    with torch.no_grad():
        _, att_j, cache_j = G._prefill(model, prompts[:5], tok.pad_token_id, "cpu", 4, chunk=16)   # joint
        _, att_c, cache_c = G._prefill(model, prompts[:5], tok.pad_token_id, "cpu", 4, chunk=2)
    assert torch.equal(att_j, att_c)
    live = att_j.bool()[:, None, :, None]                      # the real positions of every row
    for lj, lc in zip(cache_j.layers, cache_c.layers):
        assert lj.keys.shape == lc.keys.shape
        assert not lc.keys.masked_select(~live).any()            # padding columns are zeros
        # float64 keys of size ~1: another batch shape changes only the matmul blocking, ~1e-16 per operation
        # over a few hundred operations; 1e-10 is far above that and far below any real difference
        assert torch.allclose(lj.keys.masked_select(live), lc.keys.masked_select(live), rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def tiny_abs_pos(tiny):
    """A tiny GPT-2 with LEARNED ABSOLUTE position embeddings and a large init, float64. Llama's RoPE is
    shift-invariant, so a left-padding position bug can hide there; here it changes the tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel
    _, tok = tiny
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256, initializer_range=0.3,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg).double().eval()
    return model, tok


def test_batched_equals_one_at_a_time_absolute_positions(tiny_abs_pos):
    model, tok = tiny_abs_pos
    prompts = _prompts(tok)
    opts = DecodingOptions(max_new_tokens=12)
    single = [generate_from_ids(model, tok, [p], opts, batch_size=1, progress=False, return_ids=True)[0]
              for p in prompts]
    assert len({tuple(s) for s in single}) == len(single)  # the model really depends on its input
    _assert_decisive(model, tok, prompts, single, 12)
    batched = generate_from_ids(model, tok, prompts, opts, batch_size=16, progress=False, return_ids=True)
    assert batched == single


def test_matches_hf_generate_unpadded(tiny):
    """Our loop vs transformers' own greedy generate on each prompt alone (no padding at all)."""
    model, tok = tiny
    prompts = _prompts(tok, 4)
    opts = DecodingOptions(max_new_tokens=10)
    ours = generate_from_ids(model, tok, prompts, opts, batch_size=4, progress=False, return_ids=True)
    refs = []
    for p in prompts:
        ref = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             **opts.generate_kwargs(tok))[0, len(p):].tolist()
        refs.append(ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref)
    _assert_no_special_tokens(tok, refs)
    _assert_decisive(model, tok, prompts, refs, 10)
    assert ours == refs


def test_stops_at_eos_and_strips_it(tiny, monkeypatch):
    model, tok = tiny
    eos = tok.eos_token_id
    prompts = _prompts(tok, 3)

    # force EOS as the 3rd generated token for every row: bias the LM head
    calls = {"n": 0}
    orig = model.forward

    def forward(*a, **kw):
        out = orig(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            out.logits[:, -1, :] = -1e9
            out.logits[:, -1, eos] = 0
        return out

    monkeypatch.setattr(model, "forward", forward)
    ids = generate_from_ids(model, tok, prompts, DecodingOptions(max_new_tokens=20), batch_size=3,
                            progress=False, return_ids=True)
    assert all(len(x) == 2 and eos not in x for x in ids)
    monkeypatch.undo()
    calls["n"] = 0
    monkeypatch.setattr(model, "forward", forward)
    texts = generate_from_ids(model, tok, prompts, DecodingOptions(max_new_tokens=20), batch_size=3, progress=False)
    assert all("<|im_end|>" not in t for t in texts)


def test_order_preserved_and_empty_input(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    opts = DecodingOptions(max_new_tokens=5)
    out = generate_from_ids(model, tok, prompts, opts, batch_size=4, progress=False, return_ids=True)
    _assert_decisive(model, tok, prompts, out, 5)
    rev = generate_from_ids(model, tok, prompts[::-1], opts, batch_size=4, progress=False, return_ids=True)
    assert out == rev[::-1]
    assert generate_from_ids(model, tok, [], opts, progress=False) == []


# -- against transformers' own generate, on left-padded batches ------------------------------------------------

def _hf_padded(model, tok, prompts, n_new):
    """transformers' greedy generate on ONE left-padded batch (stop at EOS); ids before each row's EOS."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        att[i, L - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=n_new, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         temperature=None, top_p=None, top_k=None)
    rows = out[:, L:].tolist()
    return [r[: r.index(tok.eos_token_id)] if tok.eos_token_id in r else r for r in rows]


def _install_end_logit(model, tok, prompts, n_new):
    """Give the (untied, float64) LM head a constant EOS logit tau: EOS's weight row is zero, its bias tau, so a
    row ends at its first step whose best other logit is below tau. tau is chosen from the model's own greedy
    trajectories (EOS disabled) so that rows end at several DIFFERENT steps and at least one row runs to n_new:
    our loop then drops finished rows mid-batch (and from the KV cache), which ``generate`` never does."""
    eos = tok.eos_token_id
    head = model.get_output_embeddings()
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=torch.float64)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.weight[eos] = 0
        new.bias.zero_()
        new.bias[eos] = -1e9                      # never chosen while tau is being picked
    model.set_output_embeddings(new)
    model.config.tie_word_embeddings = False
    best = []                                     # per row: the best logit at each step of its trajectory
    for p in prompts:
        (cont,) = _hf_padded(model, tok, [p], n_new)
        assert len(cont) == n_new
        best.append(_step_logits(model, p, cont).max(-1).values.tolist())

    def stops(tau):
        return [next((s for s, v in enumerate(b) if v < tau), n_new) for b in best]

    def spread(tau):   # distinct early stop steps, provided some row runs to the end
        s = stops(tau)
        return len({x for x in s if 0 < x < n_new}) if n_new in s else -1

    values = sorted({v for b in best for v in b})
    tau = max(((a + b) / 2 for a, b in zip(values, values[1:])), key=spread)   # midpoints: far from any logit
    assert spread(tau) >= 2
    with torch.no_grad():
        new.bias[eos] = tau
    model.generation_config.eos_token_id = eos    # generate: stop at EOS (see _assert_no_special_tokens)
    return model


def _assert_same_as_hf(model, tok, n_new=N_NEW):
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) > 3      # really different lengths -> real left padding
    ref = _hf_padded(model, tok, prompts, n_new)
    lens = [len(r) for r in ref]                   # rows end at different steps, one runs to the limit
    assert n_new in lens and len({n for n in lens if n < n_new}) >= 2, lens
    _assert_no_special_tokens(tok, ref)
    _assert_decisive(model, tok, prompts, ref, n_new)
    opts = DecodingOptions(max_new_tokens=n_new)
    want = [{"new_tokens": len(r), "ended": len(r) < n_new} for r in ref]   # a row without EOS has n_new tokens
    for bs in (16, 3, 1):
        info = []
        ours = generate_from_ids(model, tok, prompts, opts, batch_size=bs, progress=False, return_ids=True,
                                 info=info)
        assert ours == ref, f"batch_size={bs}"
        assert info == want, f"batch_size={bs}"      # input order, although batches are sorted by length
    _assert_info_on_generate_path(model, tok, prompts, opts, ref, want)
    return ref


def _assert_info_on_generate_path(model, tok, prompts, opts, ref, want):
    """The same outputs and end info through model.generate (the sampling / repetition-penalty path)."""
    import unittest.mock
    with unittest.mock.patch.object(DecodingOptions, "plain_greedy", property(lambda self: False)):
        info = []
        assert generate_from_ids(model, tok, prompts, opts, batch_size=16, progress=False, return_ids=True,
                                 info=info) == ref
    assert info == want


def test_matches_hf_generate_padded_rotary(tiny):
    """The tiny Llama (rotary positions). Its stock weights (std 0.02, head tied to the embedding) make it
    repeat one token whatever the context, so a padding / cache / position bug would not change its output:
    here the 2-D weights are scaled x5 and the head is untied (and gets the EOS logit above)."""
    base, tok = tiny
    model = copy.deepcopy(base).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    _install_end_logit(model, tok, _prompts(tok), N_NEW)
    ref = _assert_same_as_hf(model, tok)
    assert all(len(set(r)) > 1 for r in ref if len(r) > 2)   # not the repeat-one-token regime


def test_matches_hf_generate_padded_absolute_positions(tiny):
    """A tiny random GPT-2 (learned ABSOLUTE position embeddings): unlike RoPE, a position id that is off,
    even by the same amount for a whole row, changes its output."""
    from transformers import GPT2Config, GPT2LMHeadModel
    _, tok = tiny
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tok), n_positions=256,
                     tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg).double().eval()
    _install_end_logit(model, tok, _prompts(tok), N_NEW)
    _assert_same_as_hf(model, tok)


# -- no_repeat_ngram_size ------------------------------------------------------------------------------------

def _ref_banned(cont: list[int], n: int) -> set[int]:
    """The definition, by brute force: the tokens t such that cont[-(n-1):] + [t] is an n-gram of cont."""
    prefix = cont[len(cont) - n + 1:] if n > 1 else []
    if len(cont) < n - 1:
        return set()
    return {cont[i + n - 1] for i in range(len(cont) - n + 1) if cont[i:i + n - 1] == prefix}


def test_ngram_ban_is_transformers_processor_on_the_generated_tokens_only():
    """NGramBan (incremental, per row) == transformers' NoRepeatNGramLogitsProcessor applied to the generated
    tokens alone, == the brute-force definition, at every step of random sequences over a small vocabulary
    (so that n-grams really repeat). The prompt does not count: transformers on prompt + generated bans more."""
    import random
    from transformers import NoRepeatNGramLogitsProcessor
    from percontrast.generation import NGramBan, _ngram_processor

    rng, V = random.Random(0), 6
    hits = 0
    for n in (1, 2, 3, 4):
        for trial in range(6):
            seq = [rng.randrange(V) for _ in range(25)]
            ban = NGramBan(n, 1)
            hf = NoRepeatNGramLogitsProcessor(n)
            for t in range(len(seq) + 1):
                gen = seq[:t]
                ours = ban.banned(0, gen)
                scores = hf(torch.tensor([gen], dtype=torch.long), torch.zeros(1, V))
                theirs = set(torch.isinf(scores[0]).nonzero().flatten().tolist())
                assert ours == theirs == _ref_banned(gen, n), (n, gen)
                hits += bool(ours)
                if t < len(seq):
                    gen.append(seq[t])
                    ban.push(0, gen)
    assert hits > 50    # the comparison saw many non-empty bans
    # the choice: prompt [3, 4], generated [3]. Counting the prompt (transformers' generate) bans 4; we do not.
    full = NoRepeatNGramLogitsProcessor(2)(torch.tensor([[3, 4, 3]]), torch.zeros(1, V))
    assert torch.isinf(full[0, 4]) and NGramBan(2, 1).banned(0, [3]) == set()
    # the model.generate path's processor: the same, with the prompt (2 columns here) left out
    proc = _ngram_processor(2, prompt_len=2)
    assert not torch.isinf(proc(torch.tensor([[3, 4, 3]]), torch.zeros(1, V))).any()
    assert torch.isinf(proc(torch.tensor([[3, 4, 3, 4, 3]]), torch.zeros(1, V))[0]).nonzero().flatten().tolist() == [4]


@torch.no_grad()
def _naive_banned_greedy(model, prompt, n_new, n, eos):
    """Greedy with the n-gram ban, one prompt, a full forward per step (no padding, no cache, no batch); every
    winner among the allowed tokens must lead by > MARGIN."""
    cont = []
    for _ in range(n_new):
        logits = model(input_ids=torch.tensor([prompt + cont]), use_cache=False).logits[0, -1].clone()
        for t in _ref_banned(cont, n):
            logits[t] = float("-inf")
        top2 = logits.topk(2)
        assert (top2.values[0] - top2.values[1]).item() > MARGIN
        tok = int(top2.indices[0])
        if tok in eos:
            break
        cont.append(tok)
    return cont


def _repeats(seq, n):
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_ngram_greedy_batched_equals_naive_and_generate_path(tiny, monkeypatch):
    """Our batched greedy loop with the ban == a naive one-prompt-at-a-time loop == the model.generate path
    (left-padded batch, transformers' processor on the generated columns), and the ban really bites: the
    stock tiny model repeats one token, so without the ban every output repeats n-grams."""
    from percontrast.generation import end_ids
    model, tok = tiny
    n = 2            # other sizes: the test above checks the ban itself for n = 1..4
    prompts = _prompts(tok, 5)
    plain = generate_from_ids(model, tok, prompts, DecodingOptions(max_new_tokens=10), progress=False,
                              return_ids=True)
    assert all(_repeats(o, n) for o in plain)
    opts = DecodingOptions(max_new_tokens=10, no_repeat_ngram_size=n)
    ref = [_naive_banned_greedy(model, p, 10, n, end_ids(model, tok)) for p in prompts]
    assert not any(_repeats(r, n) for r in ref) and ref != plain
    for bs in (16, 2):
        assert generate_from_ids(model, tok, prompts, opts, batch_size=bs, progress=False, return_ids=True) == ref
    monkeypatch.setattr(DecodingOptions, "plain_greedy", property(lambda self: False))   # force model.generate
    assert generate_from_ids(model, tok, prompts, opts, batch_size=16, progress=False, return_ids=True) == ref


def test_no_repeat_ngram_sampling(tiny):
    """Sampling (the model.generate path) at a low temperature repeats bigrams without the ban, never with it."""
    base, tok = tiny
    model = _scaled(base)
    prompts = _prompts(tok, 4)
    run = lambda n: generate_from_ids(model, tok, prompts, DecodingOptions(  # noqa: E731
        max_new_tokens=16, do_sample=True, temperature=0.3, no_repeat_ngram_size=n), progress=False,
        return_ids=True, seed=1)
    assert any(_repeats(o, 2) for o in run(0))
    outs = run(2)
    assert not any(_repeats(o, 2) for o in outs) and sum(map(len, outs)) > 30
    assert run(2) == outs                                  # seeded


def _scaled(base):
    """The tiny model with its 2-D weights x5 and an untied head: it no longer repeats one token whatever
    the context (see test_matches_hf_generate_padded_rotary)."""
    model = copy.deepcopy(base).eval()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model


def test_preallocated_cache_gives_the_concatenating_caches_tokens(tiny, tiny_abs_pos):
    """The in-place KV cache (``new_cache`` with a capacity) decodes exactly what transformers' concatenating
    DynamicCache decodes: plain greedy, with the n-gram ban and with row dropping (prompts of different
    lengths, some rows ending early), on the rotary and the absolute-position model; float64 (see the top)."""
    from percontrast.generation import new_cache
    for model, tok in (tiny, tiny_abs_pos):
        assert all(type(layer).__name__ == "GrowingLayer" for layer in new_cache(model, 8).layers)
        prompts = _prompts(tok)
        for opts in (DecodingOptions(max_new_tokens=12), DecodingOptions(max_new_tokens=12, no_repeat_ngram_size=2),
                     DecodingOptions(max_new_tokens=12, contrast_alpha=1.0)):
            contrast = [p[len(p) // 2:] or p for p in prompts] if opts.contrastive else None
            a, b = ([], [])
            fast = generate_from_ids(model, tok, prompts, opts, batch_size=4, progress=False, return_ids=True,
                                     contrast_prompts=contrast, info=a)
            stock = generate_from_ids(model, tok, prompts, opts, batch_size=4, progress=False, return_ids=True,
                                      contrast_prompts=contrast, info=b, preallocate=False)
            assert fast == stock and a == b


def test_preallocated_cache_grows_past_its_capacity(tiny):
    """Written past the planned length, the layer grows and still returns the whole history."""
    from percontrast.generation import new_cache
    model, _ = tiny
    cache = new_cache(model, 3)
    layer = cache.layers[0]
    ks = [torch.randn(2, 1, n, 4, dtype=torch.float64) for n in (2, 1, 1, 3)]
    for k in ks:
        keys, values = layer.update(k, -k)
    assert torch.equal(keys, torch.cat(ks, -2)) and torch.equal(values, -torch.cat(ks, -2))
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, torch.cat(ks, -2)[1:]) and layer.get_seq_length() == 7
