"""Batched personalized generation: left padding, KV cache, greedy by default.

With ``contrast_alpha`` > 0 (profile-contrastive decoding, ``contrast_scores``), each row's
with-profile and counterfactual prompts run together in a batch of 2B rows with one KV cache,
and the next token maximizes (or is sampled from) log p_w + alpha * (log p_w - log p_wo) among
the tokens the plausibility guard keeps. The counterfactual prompt is the profile-free one, or
with ``contrast_counterfactual="swap"`` the same request with another user's profile (chosen as
``score --counterfactual swap`` chooses it: ``retrieval.other_user_profiles``).

``no_repeat_ngram_size`` N > 0 bans, at every step, each token that would complete an N-gram
already present in the row's own generated tokens (the prompt does not count: the output may
copy a phrase of the profile or the input, but not repeat one it already wrote). Our loops keep the n-grams per row
incrementally (``NGramBan``); ``model.generate`` gets transformers' ``NoRepeatNGramLogitsProcessor``
applied to the generated columns only. In the contrast loop the ban applies before the
plausibility guard, so the guard is relative to the best token that is still allowed.

``info`` (a list) receives one dict per prompt, in input order: ``new_tokens`` (generated
tokens, end token excluded) and ``ended`` (True when the row stopped at an end id; False when it
ran to ``max_new_tokens``), on every path. With ``explain=True`` (contrastive greedy decoding
only) each dict also holds the per-token trace the token explorer shows: the chosen
``token_ids``, ``plain_ids`` (the with-profile argmax at that step: the token plain greedy
decoding, alpha 0, would have picked after the same prefix), both log-probs of the chosen
token, the with-profile entropy and the top candidates of both distributions. These come from
the logits the contrast loop computes anyway.

Greedy decoding (the default, and what ``eval`` / ``compare`` use) runs our own loop
instead of ``model.generate``, for speed on small CPUs:

* prompts are sorted by length, so a batch wastes little padding; outputs come back in
  input order;
* the prefill computes the LM head for the last position only (``logits_to_keep=1``);
* rows that have produced EOS are dropped from the batch and its KV cache
  (``batch_select_indices``) once a quarter of the batch has finished (``COMPACT_SHARE``), so the
  remaining rows stop paying for them without a cache copy per finished row; ``model.generate``
  keeps computing finished rows until the whole batch is done;
* the KV cache is allocated once per batch and written in place (``new_cache``), not concatenated;
* a batch of more than ``PREFILL_CHUNK`` rows is prefilled that many rows at a time, each chunk at its
  own padded length, into one cache (``_merge_prefills``), so a large batch (``batch_size`` 0: up to
  ``AUTO_BATCH_CAP`` rows, from free memory) decodes many rows per step without paying the longest
  prompt's length for every row in the prefill.

Position ids come from the attention mask (each row counts only its real tokens), so a
left-padded row computes what it would compute alone; ``tests/test_generation.py``
checks batched == one-at-a-time token for token. Generation stops at EVERY end id (the
tokenizer's EOS, the chat template's end-of-turn token, the model's generation-config
EOS ids), on both paths; the end token is never part of the output. Sampling or a repetition
penalty go through ``model.generate`` with the same batching (same outputs contract, no row
dropping); contrastive sampling stays in our loop.
"""
from __future__ import annotations

import math

import torch

from .options import DecodingOptions  # noqa: F401  (the decoding options; re-exported for callers)
from .pir import token_entropy, token_logprobs


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), L), dtype=torch.long)
    for b, p in enumerate(batch):  # every prompt ends at column L
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        att[b, L - len(p):] = 1
    return ids, att


def _growing_layer_class():
    """A ``DynamicLayer`` that appends into a preallocated buffer instead of ``torch.cat``.

    The stock layer concatenates the whole key/value history with every new token, so a step costs
    a copy of the cache (about 10% of a decode step at 135M on 2 cores, measured in
    ``benchmarks/eval_cell.py``). This one allocates ``capacity`` positions at the first update (the
    prefill) and writes each new token in place; ``keys`` / ``values`` are views of the filled part,
    so attention sees exactly the tensors the stock layer would build, value for value. A row
    dropped from the batch (``batch_select_indices``) keeps its buffer's spare capacity."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.filled = 0

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                shape = (*key_states.shape[:2], max(self.capacity, n), key_states.shape[-1])
                self._k = key_states.new_empty(shape)
                self._v = value_states.new_empty((*shape[:3], value_states.shape[-1]))
            elif self.filled + n > self._k.shape[-2]:   # past the planned length: grow (never in our loops)
                extra = self.filled + n - self._k.shape[-2]
                self._k = torch.cat([self._k, self._k.new_empty((*self._k.shape[:2], extra, self._k.shape[-1]))], -2)
                self._v = torch.cat([self._v, self._v.new_empty((*self._v.shape[:2], extra, self._v.shape[-1]))], -2)
            self._k[:, :, self.filled:self.filled + n] = key_states
            self._v[:, :, self.filled:self.filled + n] = value_states
            self.filled += n
            self.keys, self.values = self._k[:, :, :self.filled], self._v[:, :, :self.filled]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if self.is_initialized:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[:, :, :self.filled], self._v[:, :, :self.filled]

    return GrowingLayer


def new_cache(model, capacity: int | None = None):
    """A fresh KV cache for our decoding loops: with ``capacity`` (prompt length + new tokens), every
    full-attention layer appends in place (``_growing_layer_class``); a model with other layer kinds
    (sliding windows, linear attention) keeps transformers' own layers."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    if capacity is not None and cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        growing = _growing_layer_class()
        cache.layers = [growing(capacity) for _ in cache.layers]
    return cache


def _full_attention_only(model) -> bool:
    """Every cache layer is a plain full-attention one (what ``_prefill_pair`` can merge exactly)."""
    layers = new_cache(model, 1).layers
    return bool(layers) and all(type(layer).__name__ == "GrowingLayer" for layer in layers)


# Finished rows leave the batch (a copy of the KV cache) once at most this share of its rows is live;
# until then they ride along: one copy per quarter of the batch instead of one per finished row.
COMPACT_SHARE = 0.75
# batch_size 0: at most this many decoding rows. A decoding step's weights are read once for all its rows,
# so more rows per step is more tokens per second until compute or the KV cache's bandwidth binds; a study
# eval set (155 mails) fits one batch (benchmarks/eval_cell.py times that path against the old one).
AUTO_BATCH_CAP = 256
# ... and at most this many rows per likelihood forward on a CPU: a forward of 16 rows x ~100 tokens
# already keeps the matmuls busy there, and every extra row in a length-sorted batch only adds padding
# (the batch pads to its longest row). A GPU gets AUTO_BATCH_CAP.
CPU_SCORE_BATCH_CAP = 16
PREFILL_CHUNK = 16           # rows per prefill forward of a larger decoding batch (see _prefill)
AUTO_BATCH_SHARE = 0.25      # ... within this share of the free memory


def free_memory_bytes(device) -> int:
    """Free memory where the model runs: the GPU's free bytes, or the machine's available RAM (Linux:
    MemAvailable; elsewhere a conservative 4 GiB)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_batch_size(model, seq_len: int, logit_positions: int = 1, rows_per_example: int = 1,
                    free_bytes: int | None = None, cap: int | None = None) -> int:
    """Examples per batch for ``batch_size`` 0: the most that fit ``AUTO_BATCH_SHARE`` of the free
    memory, at most ``AUTO_BATCH_CAP``. Per row: the KV cache of ``seq_len`` positions, float32 logits
    at ``logit_positions`` (x3: the logits, a log-softmax's exp and its result live together), and one
    layer's widest activations over ``seq_len`` during the prefill (x4 for the MLP's gate, up, product
    and output). ``rows_per_example``: 2 for contrastive decoding (two prompts per example). ``cap``:
    another upper bound than ``AUTO_BATCH_CAP`` (``score_batch_cap`` for likelihood passes)."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", 1024)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    layers = getattr(cfg, "num_hidden_layers", 1)
    width = max(getattr(cfg, "intermediate_size", 0) or 0, hidden)
    vocab = getattr(cfg, "vocab_size", 50_000)
    elem = next(model.parameters()).element_size()
    per_row = (layers * 2 * kv_heads * head_dim * seq_len * elem + 3 * logit_positions * vocab * 4
               + 4 * seq_len * width * elem) * rows_per_example
    if free_bytes is None:
        free_bytes = free_memory_bytes(next(model.parameters()).device)
    return max(1, min(cap or AUTO_BATCH_CAP, int(AUTO_BATCH_SHARE * free_bytes // per_row)))


def score_batch_cap(model) -> int:
    """The most rows ``auto_batch_size`` gives a likelihood pass on this model's device."""
    return CPU_SCORE_BATCH_CAP if next(model.parameters()).device.type == "cpu" else AUTO_BATCH_CAP


def _prefill(model, prompts: list[list[int]], pad_id: int, device, new_tokens: int | None = None,
             chunk: int | None = None):
    """One forward over the left-padded prompts into a fresh KV cache, the LM head on the last
    position only: (output, attention mask, cache). ``new_tokens``: how many tokens will follow, so
    the cache can be allocated once (``new_cache``); None keeps the stock growing-by-concatenation.
    With ``new_tokens`` on a full-attention model, a batch of more than ``chunk`` rows (default
    ``PREFILL_CHUNK``) is prefilled ``chunk`` rows at a time, each chunk at its own padded length
    (``_merge_prefills``): callers sort prompts by length, so a large decoding batch does not pay
    the longest prompt's length for every row in the prefill."""
    chunk = chunk or PREFILL_CHUNK
    if new_tokens is not None and len(prompts) > chunk and _full_attention_only(model):
        parts = [_prefill(model, prompts[i:i + chunk], pad_id, device) for i in range(0, len(prompts), chunk)]
        return _merge_prefills(model, parts, new_tokens)
    ids, att = _left_pad(prompts, pad_id)
    ids, att = ids.to(device), att.to(device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0 in every row
    cache = new_cache(model, None if new_tokens is None else ids.shape[1] + new_tokens)
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, cache=cache, use_cache=True,
                logits_to_keep=1)
    return out, att, cache


def _merge_prefills(model, parts: list[tuple], new_tokens: int):
    """Prefills of several row groups (each ``_prefill``'s (output, mask, cache), each at its own padded
    length) as ONE batch in one in-place cache of the longest length + ``new_tokens``. A shorter group's
    keys and values are left-padded with zeros; its attention mask is 0 there, exactly as for the pad
    tokens of a joint prefill, so every later step computes what the joint prefill's cache would give
    it (a masked column gets no attention weight, whatever it holds; position ids come from the mask)."""
    L = max(p[1].shape[1] for p in parts)

    def pad_left(t: torch.Tensor, dim: int) -> torch.Tensor:
        extra = L - t.shape[dim]
        if not extra:
            return t
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    cache = new_cache(model, L + new_tokens)
    for i, layers in enumerate(zip(*(p[2].layers for p in parts))):
        cache.update(torch.cat([pad_left(layer.keys, 2) for layer in layers]),
                     torch.cat([pad_left(layer.values, 2) for layer in layers]), i)
    att = torch.cat([pad_left(p[1], 1) for p in parts])
    out = type(parts[0][0])(logits=torch.cat([p[0].logits for p in parts]))
    return out, att, cache


def _prefill_pair(model, first: list[list[int]], second: list[list[int]], pad_id: int, device, new_tokens: int):
    """``_prefill`` of ``first + second`` as one batch of 2B rows, each half prefilled on its own (the
    counterfactual prompts of contrastive decoding are often much shorter than the with-profile ones,
    and one joint batch would run them at the longer length), and each half in chunks of
    ``PREFILL_CHUNK`` rows as ``_prefill`` does for a large batch; all merged once (``_merge_prefills``)."""
    c = PREFILL_CHUNK
    parts = [_prefill(model, part[i:i + c], pad_id, device) for part in (first, second)
             for i in range(0, len(part), c)]
    return _merge_prefills(model, parts, new_tokens)


class NGramBan:
    """``no_repeat_ngram_size``: per row, the tokens that would complete an n-gram already present in
    the row's generated tokens (prompt excluded). Kept incrementally: ``seen[row]`` maps each
    (n-1)-gram of the row's continuation to the tokens that followed it; ``push`` after every
    appended token, ``banned`` for the next step. Equal to transformers' ``NoRepeatNGramLogitsProcessor``
    applied to the generated tokens alone (``tests/test_generation.py`` checks it)."""

    def __init__(self, n: int, rows: int):
        self.n = n
        self.seen: list[dict[tuple, set[int]]] = [{} for _ in range(rows)]

    def push(self, row: int, gen: list[int]) -> None:
        if len(gen) >= self.n:
            self.seen[row].setdefault(tuple(gen[len(gen) - self.n:-1]), set()).add(gen[-1])

    def banned(self, row: int, gen: list[int]) -> set[int]:
        if len(gen) < self.n:   # no complete n-gram yet
            return set()
        return self.seen[row].get(tuple(gen[len(gen) - self.n + 1:]), set())

    def mask(self, scores: torch.Tensor, rows: list[int], result: list[list[int]]) -> torch.Tensor:
        """``scores`` [len(rows), V] with each live row's banned tokens at -inf (a copy when any is)."""
        js, toks = [], []
        for j, r in enumerate(rows):
            if r < 0:          # a finished row still in the batch
                continue
            b = self.banned(r, result[r])
            js += [j] * len(b)
            toks += sorted(b)
        if not js:
            return scores
        scores = scores.clone()
        scores[torch.tensor(js, device=scores.device), torch.tensor(toks, device=scores.device)] = float("-inf")
        return scores


def _ngram_processor(n: int, prompt_len: int):
    """For ``model.generate``: transformers' ``NoRepeatNGramLogitsProcessor`` on the generated columns only
    (every left-padded prompt ends at column ``prompt_len``)."""
    from transformers import LogitsProcessor, NoRepeatNGramLogitsProcessor

    inner = NoRepeatNGramLogitsProcessor(n)

    class GeneratedNoRepeatNGram(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return inner(input_ids[:, prompt_len:], scores)

    return GeneratedNoRepeatNGram()


def _append(nxt: torch.Tensor, rows: list[int], result: list[list[int]], eos: set[int], ended: list[bool],
            ban: NGramBan | None = None) -> list[int]:
    """Append each live row's new token to its result (an end id marks the row ended instead); the batch
    positions that go on. A position whose row is -1 finished earlier and is skipped."""
    keep = []
    for j, tok in enumerate(nxt.tolist()):
        if rows[j] < 0:
            continue
        if tok in eos:
            ended[rows[j]] = True
            continue
        result[rows[j]].append(tok)
        if ban is not None:
            ban.push(rows[j], result[rows[j]])
        keep.append(j)
    return keep


def _greedy_batch(model, batch: list[list[int]], max_new_tokens: int, eos: set[int], pad_id: int,
                  device, no_repeat_ngram_size: int = 0, preallocate: bool = True) -> tuple[list[list[int]], list[bool]]:
    """Greedy continuation ids (EOS excluded) for one left-padded batch, dropping finished rows; and
    per row whether it ended at an end id."""
    out, att, cache = _prefill(model, batch, pad_id, device, max_new_tokens if preallocate else None)
    return _greedy_from(model, out.logits[:, -1, :], att, cache, max_new_tokens, eos, device, no_repeat_ngram_size)


def _greedy_from(model, last_logits: torch.Tensor, att: torch.Tensor, cache, max_new_tokens: int, eos: set[int],
                 device, no_repeat_ngram_size: int = 0) -> tuple[list[list[int]], list[bool]]:
    """The greedy loop after a prefill: ``last_logits`` [B, V] predict each row's first new token,
    ``att`` / ``cache`` hold the prompts."""
    B = last_logits.shape[0]
    rows = list(range(B))          # original row of each live batch position
    result: list[list[int]] = [[] for _ in range(B)]
    ended = [False] * B
    ban = NGramBan(no_repeat_ngram_size, B) if no_repeat_ngram_size else None
    for step in range(max_new_tokens):
        logits = last_logits if step == 0 else out.logits[:, -1, :]
        if ban is not None:
            logits = ban.mask(logits, rows, result)
        nxt = logits.argmax(-1)
        keep = _append(nxt, rows, result, eos, ended, ban)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) <= COMPACT_SHARE * len(rows):  # drop finished rows from the batch and the cache
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            att, nxt = att[sel], nxt[sel]
            rows = [rows[j] for j in keep]
        else:   # few finished: they ride along (their tokens are ignored) until compacting pays
            live = set(keep)
            rows = [r if j in live else -1 for j, r in enumerate(rows)]
        att = torch.cat([att, att.new_ones((len(rows), 1))], dim=1)
        pos = att.sum(-1, keepdim=True) - 1
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=pos, cache=cache, use_cache=True)
    return result, ended


def contrast_scores(logits_with: torch.Tensor, logits_without: torch.Tensor, alpha: float,
                    plausibility: float) -> torch.Tensor:
    """Profile-contrastive next-token scores [n, V]: log p_w + alpha * (log p_w - log p_wo), where p_w
    conditions on the profile and p_wo does not (or on another user's); tokens with p_w < plausibility *
    max p_w get -inf. A token whose with-profile logit is -inf (banned) gets -inf, and the guard is then
    relative to the best token left."""
    lw = torch.log_softmax(logits_with.double(), dim=-1)
    lo = torch.log_softmax(logits_without.double(), dim=-1)
    s = lw + alpha * (lw - lo)
    if plausibility > 0:
        floor = lw.max(dim=-1, keepdim=True).values + math.log(plausibility)
        s = s.masked_fill(lw < floor, float("-inf"))
    return s


def _pick(scores: torch.Tensor, options: DecodingOptions, generator) -> torch.Tensor:
    """Greedy argmax, or a sample at ``temperature`` from the top-p nucleus."""
    if not options.do_sample:
        return scores.argmax(-1)
    probs = torch.softmax(scores / options.temperature, dim=-1)
    if options.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= options.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


TRACE_TOP = 5   # candidates per distribution an explain trace keeps (the explorer shows 5)


def _new_trace() -> dict:
    return {"token_ids": [], "plain_ids": [], "logp_with": [], "logp_without": [], "entropy": [],
            "top_with": [], "top_without": []}


def _record(traces: list[dict], rows: list[int], nxt: torch.Tensor, logits_with: torch.Tensor,
            logits_without: torch.Tensor, allowed_with: torch.Tensor, eos: set[int]) -> None:
    """One step of the explain trace for every live row whose token is not an end id. ``allowed_with``
    is the with-profile logits after the n-gram ban: its argmax is plain greedy decoding's pick."""
    lw = torch.log_softmax(logits_with.double(), dim=-1)
    lo = torch.log_softmax(logits_without.double(), dim=-1)
    idx = nxt[:, None]
    cols = {"token_ids": nxt.tolist(), "plain_ids": allowed_with.argmax(-1).tolist(),
            "logp_with": lw.gather(-1, idx).squeeze(-1).tolist(),
            "logp_without": lo.gather(-1, idx).squeeze(-1).tolist(),
            "entropy": (-(lw.exp() * lw).nan_to_num(0.0).sum(-1)).tolist()}
    for key, l in (("top_with", lw), ("top_without", lo)):
        top = l.topk(min(TRACE_TOP, l.shape[-1]), dim=-1)
        cols[key] = [[[i, p] for i, p in zip(ids, ps)]
                     for ids, ps in zip(top.indices.tolist(), top.values.exp().tolist())]
    for j, tok in enumerate(cols["token_ids"]):
        if tok in eos:
            continue
        for key, col in cols.items():
            traces[rows[j]][key].append(col[j])


def _contrast_batch(model, with_p: list[list[int]], without_p: list[list[int]], options: DecodingOptions,
                    eos: set[int], pad_id: int, device, generator=None, explain: bool = False,
                    preallocate: bool = True):
    """Contrastive continuation ids for one batch: the B with-profile and B counterfactual prompts are
    one left-padded batch of 2B rows (rows b and B + b belong together) with one KV cache; each step
    scores with ``contrast_scores`` (banned n-grams removed first), appends the chosen token to both
    rows, and drops finished pairs. Returns (ids, ended, traces or None)."""
    B = len(with_p)
    if preallocate and _full_attention_only(model):
        out, att, cache = _prefill_pair(model, with_p, without_p, pad_id, device, options.max_new_tokens)
    else:
        out, att, cache = _prefill(model, with_p + without_p, pad_id, device)
    rows = list(range(B))
    result: list[list[int]] = [[] for _ in range(B)]
    ended = [False] * B
    traces = [_new_trace() for _ in range(B)] if explain else None
    ban = NGramBan(options.no_repeat_ngram_size, B) if options.no_repeat_ngram_size else None
    for step in range(options.max_new_tokens):
        n = len(rows)
        last = out.logits[:, -1, :]
        with_logits = last[:n] if ban is None else ban.mask(last[:n], rows, result)
        nxt = _pick(contrast_scores(with_logits, last[n:], options.contrast_alpha, options.contrast_plausibility),
                    options, generator)
        if traces is not None:
            _record(traces, rows, nxt, last[:n], last[n:], with_logits, eos)
        keep = _append(nxt, rows, result, eos, ended, ban)
        if not keep or step == options.max_new_tokens - 1:
            break
        if len(keep) < n:   # a finished row leaves both halves of the batch and the cache
            sel = torch.tensor(keep + [n + j for j in keep], device=device)
            cache.batch_select_indices(sel)
            att = att[sel]
            nxt = nxt[torch.tensor(keep, device=device)]
            rows = [rows[j] for j in keep]
        att = torch.cat([att, att.new_ones((att.shape[0], 1))], dim=1)
        pos = att.sum(-1, keepdim=True) - 1
        out = model(input_ids=torch.cat([nxt, nxt])[:, None], attention_mask=att, position_ids=pos, cache=cache,
                    use_cache=True)
    return result, ended, traces


def _hf_generate_batch(model, tokenizer, batch: list[list[int]], options: DecodingOptions, eos: set[int],
                       device) -> tuple[list[list[int]], list[bool]]:
    """``model.generate`` on one left-padded batch: (ids before each row's first end id, ended)."""
    ids, att = _left_pad(batch, tokenizer.pad_token_id)
    kw = options.generate_kwargs(tokenizer, eos)
    if options.no_repeat_ngram_size:
        from transformers import LogitsProcessorList
        kw["logits_processor"] = LogitsProcessorList([_ngram_processor(options.no_repeat_ngram_size, ids.shape[1])])
    out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kw)
    cut = [_until_end(row, eos) for row in out[:, ids.shape[1]:].tolist()]
    return [c for c, _ in cut], [e for _, e in cut]


def _until_end(row: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """The ids before the first end id (``generate`` pads finished rows after it), and whether there was one."""
    for i, t in enumerate(row):
        if t in eos:
            return row[:i], True
    return row, False


def end_ids(model, tokenizer) -> set[int]:
    """Every id that ends a generation: EOS, the chat template's end of turn, and the model's
    generation-config EOS ids (e.g. <|endoftext|> beside <|im_end|>)."""
    from .encoding import end_of_turn_id

    eos = {t for t in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if t is not None}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(gen) if isinstance(gen, list) else ({gen} if gen is not None else set())
    return eos


@torch.no_grad()
def generate_from_ids(model, tokenizer, prompts: list[list[int]], options: DecodingOptions,
                      batch_size: int | None = None, progress: bool = True, return_ids: bool = False,
                      seed: int = 0, contrast_prompts: list[list[int]] | None = None, info: list | None = None,
                      explain: bool = False, preallocate: bool = True) -> list:
    """One completion per prompt (token ids), batched (``batch_size``, default the options'); decoded
    texts (or the generated ids, EOS excluded, with ``return_ids``) in input order. ``seed`` seeds
    sampling. With ``options.contrast_alpha`` > 0, ``contrast_prompts`` (one per prompt: the same
    request without the profile, or with another user's) is what the profile is contrasted with.
    ``info``: a list that gets one dict per prompt appended, in input order: ``new_tokens`` and
    ``ended``, and with ``explain`` (contrastive greedy decoding only) the explain trace (see the
    module docstring). ``preallocate=False`` decodes with transformers' concatenating KV cache (the
    benchmarks' "before" path; same tokens)."""
    batch_size = batch_size or options.batch_size or auto_batch_size(
        model, max((len(p) for p in prompts), default=1) + options.max_new_tokens,
        rows_per_example=2 if options.contrastive else 1)
    if options.contrastive and (contrast_prompts is None or len(contrast_prompts) != len(prompts)):
        raise ValueError("contrast_alpha > 0 needs one contrast prompt per prompt")
    if explain and (not options.contrastive or options.do_sample or info is None):
        raise ValueError("explain traces contrastive greedy decoding (contrast_alpha > 0, no sampling) into info")
    from tqdm.auto import tqdm

    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    gen: list[list[int] | None] = [None] * len(prompts)
    ends: list[bool] = [False] * len(prompts)
    traces: list[dict | None] = [None] * len(prompts)
    if options.do_sample:
        torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed) if options.do_sample else None
    eos = end_ids(model, tokenizer)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            batch = [prompts[i] for i in idx]
            tr = None
            if options.contrastive:
                res, end, tr = _contrast_batch(model, batch, [contrast_prompts[i] for i in idx], options, eos,
                                               tokenizer.pad_token_id, device, generator, explain=explain,
                                               preallocate=preallocate)
            elif options.plain_greedy:
                res, end = _greedy_batch(model, batch, options.max_new_tokens, eos, tokenizer.pad_token_id, device,
                                         options.no_repeat_ngram_size, preallocate)
            else:
                res, end = _hf_generate_batch(model, tokenizer, batch, options, eos, device)
            for b, i in enumerate(idx):
                gen[i], ends[i] = res[b], end[b]
                if tr is not None:
                    traces[i] = tr[b]
    finally:
        if was_training:
            model.train()
    if info is not None:
        info.extend({"new_tokens": len(g), "ended": e, **(t or {})}  # type: ignore[arg-type]
                    for g, e, t in zip(gen, ends, traces))
    if return_ids:
        return gen  # type: ignore[return-value]
    return [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen]  # type: ignore[arg-type]


@torch.no_grad()
def generate_and_score(model, tokenizer, encoded: list[dict], options: DecodingOptions, batch_size: int | None = None,
                       progress: bool = True, info: list | None = None,
                       score_batch_size: int | None = None) -> tuple[list[list[int]], list[dict]]:
    """Greedy generations AND the gold responses' per-token log-probs, each with-profile prompt
    prefilled ONCE.

    ``encoded``: ``PromptBuilder.encode`` results WITH the gold response. An evaluation cell needs the
    model's generation from the with-profile prompt and its log-probs of the gold response after that
    same prompt (likelihood metrics, PIR); computed apart, every prompt runs through the model twice.
    Here each generation batch (sorted by prompt length) is prefilled once into the in-place KV cache.
    The gold responses are then scored on copies of that cache, in sub-batches of rows with similar
    response length (prompt and response lengths are anti-correlated in the study's data, so one
    right-padded gold batch per generation batch would be mostly padding); the logits of a token after
    a cached prefix equal those of one full forward up to float rounding, so this gives
    ``scoring.score_batch``'s with-profile log-probs and entropy. Greedy decoding then continues from
    the prefill's last logits on the untouched cache. The profile-free pass (``counterfactual_logp``:
    another prompt, nothing to share) runs apart, in batches bucketed by its own length.

    ``batch_size`` (default the options'; 0: from memory) is the generation batch, ``score_batch_size``
    (default: the same when fixed, else from memory for the logits) the gold and profile-free batches.
    Returns (generated ids per example, EOS excluded; per example ``logp_with``, ``logp_without``,
    ``entropy`` tensors [n] over the gold tokens), in input order; ``info`` as ``generate_from_ids``.
    Plain greedy decoding only, on models whose cache layers are all full attention (``shares_prefill``)."""
    from .encoding import PairedCollator
    from .scoring import counterfactual_logp

    if not shares_prefill(model, options):
        raise ValueError("generate_and_score: plain greedy decoding on a full-attention model only")
    from tqdm.auto import tqdm

    if not encoded:
        return [], []
    longest_prompt = max(len(e["prompt_with"]) for e in encoded)
    longest_gold = max(len(e["response"]) for e in encoded)
    fixed = batch_size or options.batch_size
    batch_size = fixed or auto_batch_size(model, longest_prompt + options.max_new_tokens)
    score_batch_size = score_batch_size or fixed or auto_batch_size(
        model, longest_prompt + longest_gold, logit_positions=longest_gold, cap=score_batch_cap(model))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    eos = end_ids(model, tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["prompt_with"]))
    gen: list = [None] * len(encoded)
    ends: list = [False] * len(encoded)
    logp_with: list = [None] * len(encoded)
    entropy: list = [None] * len(encoded)
    logp_without: list = [None] * len(encoded)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generating + scoring", disable=not progress,
                          leave=False):
            idx = order[start:start + batch_size]
            out, att, cache = _prefill(model, [encoded[i]["prompt_with"] for i in idx], pad_id, device,
                                       options.max_new_tokens)
            last = out.logits[:, -1, :]
            by_gold = sorted(range(len(idx)), key=lambda b: -len(encoded[idx[b]]["response"]))
            for s0 in range(0, len(by_gold), score_batch_size):
                rows = by_gold[s0:s0 + score_batch_size]
                lw, ent = _score_gold_on_cache(model, cache, att, last, [encoded[idx[b]]["response"] for b in rows],
                                               rows, pad_id, device)
                for j, b in enumerate(rows):
                    n = len(encoded[idx[b]]["response"])
                    logp_with[idx[b]], entropy[idx[b]] = lw[j, :n], ent[j, :n]
            res, end = _greedy_from(model, last, att, cache, options.max_new_tokens, eos, device,
                                    options.no_repeat_ngram_size)
            for b, i in enumerate(idx):
                gen[i], ends[i] = res[b], end[b]
            del out, cache
        collate = PairedCollator(pad_id)
        # the response-aligned layout pads to the longest prompt plus the longest response: bucket by the
        # response (its lengths spread far more than the profile-free prompts')
        by_cf = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]["response"]),
                                                           -len(encoded[i]["prompt_without"])))
        for s0 in range(0, len(by_cf), score_batch_size):
            idx = by_cf[s0:s0 + score_batch_size]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([encoded[i] for i in idx]).items()}
            lo = counterfactual_logp(model, batch)
            for b, i in enumerate(idx):
                logp_without[i] = lo[b, : len(encoded[i]["response"])]
    finally:
        if was_training:
            model.train()
    if info is not None:
        info.extend({"new_tokens": len(g), "ended": e} for g, e in zip(gen, ends))
    scores = [{"logp_with": w, "logp_without": wo, "entropy": h} for w, wo, h in zip(logp_with, logp_without, entropy)]
    return gen, scores


def _score_gold_on_cache(model, cache, att, last, golds: list[list[int]], rows: list[int], pad_id: int,
                         device) -> tuple[torch.Tensor, torch.Tensor]:
    """With-profile log-probs and entropy [len(rows), R] of the gold responses of batch ``rows``, fed on
    a copy of those rows' prompt cache (the prompt is not run again; the original cache is untouched)."""
    R = max(len(g) for g in golds)
    sel = torch.tensor(rows, device=device)
    a = att[sel]
    last = last[sel]
    gold = torch.full((len(rows), R), pad_id, dtype=torch.long, device=device)
    gmask = torch.zeros((len(rows), R), dtype=torch.long, device=device)
    for j, g in enumerate(golds):
        gold[j, : len(g)] = torch.tensor(g, dtype=torch.long)
        gmask[j, : len(g)] = 1
    if R > 1:   # gold token j+1 is predicted at gold position j; token 1 by the prompt's last position
        fork = new_cache(model, a.shape[1] + R)
        for li, layer in enumerate(cache.layers):
            fork.update(layer.keys[sel], layer.values[sel], li)
        pos = a.sum(-1, keepdim=True) + torch.arange(R - 1, device=device)[None]
        g = model(input_ids=gold[:, :-1], attention_mask=torch.cat([a, gmask[:, :-1]], 1), position_ids=pos,
                  cache=fork, use_cache=True)
        logits = torch.cat([last[:, None], g.logits], 1)      # [rows, R, V]
        del g, fork
    else:
        logits = last[:, None]
    return token_logprobs(logits, gold), token_entropy(logits)


def shares_prefill(model, options: DecodingOptions) -> bool:
    """Whether ``generate_and_score`` can serve these options on this model."""
    return options.plain_greedy and not options.contrastive and _full_attention_only(model)


def generate_records(model, tokenizer, records: list[dict], builder, options: DecodingOptions, *,
                     use_profile: bool = True, progress: bool = True, seed: int = 0, info: list | None = None,
                     explain: bool = False) -> list[str]:
    """Personalized (or, with ``use_profile=False``, profile-free) generations for records. With
    ``options.contrast_alpha`` > 0 each row is contrasted with its own profile-free prompt, or with
    ``contrast_counterfactual="swap"`` with the same request holding another user's profile: the one
    ``score --counterfactual swap`` puts there (``retrieval.other_user_profiles(records, builder.seed)``:
    deterministic by the prompt seed, among the users of ``records``). ``info`` / ``explain``: see
    ``generate_from_ids``; with ``explain`` the dicts also hold ``profile`` (the items as they stood in
    the prompt) and ``profile_removed``."""
    from .errors import UserError
    if options.contrastive and not use_profile:
        raise UserError("--contrast-alpha contrasts the profile with its absence; it needs the profile "
                        "(drop --no-profile)")
    others = None
    if options.contrastive and options.contrast_counterfactual == "swap":
        from .retrieval import other_user_profiles
        try:
            others = other_user_profiles(records, builder.seed)
        except UserError as e:
            raise UserError(f"--contrast-counterfactual swap takes another user's profile: it {e}") from None
    prompts, contrast, shown = [], [], []
    for i, r in enumerate(records):
        e = builder.encode(r, with_response=False, counterfactual_profile=None if others is None else others[i])
        prompts.append(e["prompt_with"] if use_profile else e["prompt_without"])
        contrast.append(e["prompt_without"])
        shown.append({"profile": e["profile_shown"], "profile_removed": e["profile_removed"]})
    got: list | None = [] if info is not None else None
    texts = generate_from_ids(model, tokenizer, prompts, options, progress=progress, seed=seed,
                              contrast_prompts=contrast if options.contrastive else None, info=got,
                              explain=explain)
    if info is not None:
        info.extend({**g, **s} if explain else g for g, s in zip(got, shown))  # type: ignore[arg-type]
    return texts


def hit_max_share(info: list[dict]) -> float | None:
    """The share of generations (``info`` dicts) that ran to ``max_new_tokens`` without an end id; None
    for no generations."""
    return sum(not i["ended"] for i in info) / len(info) if info else None


def generate_for(model, tok, records: list[dict], task: str, prompt_opts, options: DecodingOptions, *,
                 use_profile: bool, seed: int = 0, progress: bool = True, stats=None, info: list | None = None,
                 explain: bool = False) -> list[str]:
    """Generations for ``records`` with the prompt settings of ``prompt_opts`` (a ``PromptOptions``:
    k, retriever, max_length, and the seed that picks the other user for ``contrast_counterfactual=
    "swap"``). Prompts get the profile budget training gives the same record; ``stats`` (an
    ``EncodeStats``) collects how many profiles the length limit cut or removed; ``seed`` seeds
    sampling; ``info`` / ``explain``: see ``generate_records``."""
    builder = prompt_opts.prompt_builder(tok, task, reserve_tokens=options.max_new_tokens)
    if stats is not None:
        builder.stats = stats
    texts = generate_records(model, tok, records, builder, options, use_profile=use_profile,
                             progress=progress, seed=seed, info=info, explain=explain)
    builder.stats.warn()
    return texts
