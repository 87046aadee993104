"""Batched personalized generation: left padding, KV cache, greedy by default.

With ``contrast_alpha`` > 0 (profile-contrastive decoding, ``contrast_scores``), each row's
with-profile and profile-free prompts run together in a batch of 2B rows with one KV cache,
and the next token maximizes (or is sampled from) log p_w + alpha * (log p_w - log p_wo) among
the tokens the plausibility guard keeps.

Greedy decoding (the default, and what ``eval`` / ``compare`` use) runs our own loop
instead of ``model.generate``, for speed on small CPUs:

* prompts are sorted by length, so a batch wastes little padding; outputs come back in
  input order;
* the prefill computes the LM head for the last position only (``logits_to_keep=1``);
* a row that has produced EOS is dropped from the batch and its KV cache
  (``DynamicCache.batch_select_indices``), so the remaining rows stop paying for it;
  ``model.generate`` keeps computing finished rows until the whole batch is done.

Position ids come from the attention mask (each row counts only its real tokens), so a
left-padded row computes what it would compute alone; ``tests/test_generation.py``
checks batched == one-at-a-time token for token. Generation stops at EVERY end id (the
tokenizer's EOS, the chat template's end-of-turn token, the model's generation-config
EOS ids), on both paths; the end token is never part of the output. Sampling or a repetition penalty go through ``model.generate`` with the same
batching (same outputs contract, no row dropping).
"""
from __future__ import annotations

import math

import torch

from .options import DecodingOptions  # noqa: F401  (the decoding options; re-exported for callers)


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), L), dtype=torch.long)
    for b, p in enumerate(batch):  # every prompt ends at column L
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        att[b, L - len(p):] = 1
    return ids, att


def _prefill(model, prompts: list[list[int]], pad_id: int, device):
    """One forward over the left-padded prompts into a fresh KV cache, the LM head on the last
    position only: (output, attention mask, cache)."""
    from transformers import DynamicCache

    ids, att = _left_pad(prompts, pad_id)
    ids, att = ids.to(device), att.to(device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0 in every row
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, cache=cache, use_cache=True,
                logits_to_keep=1)
    return out, att, cache


def _append(nxt: torch.Tensor, rows: list[int], result: list[list[int]], eos: set[int]) -> list[int]:
    """Append each live row's new token to its result; the batch positions that go on (not ended)."""
    keep = []
    for j, tok in enumerate(nxt.tolist()):
        if tok in eos:
            continue
        result[rows[j]].append(tok)
        keep.append(j)
    return keep


def _greedy_batch(model, batch: list[list[int]], max_new_tokens: int, eos: set[int], pad_id: int,
                  device) -> list[list[int]]:
    """Greedy continuation ids (EOS excluded) for one left-padded batch, dropping finished rows."""
    out, att, cache = _prefill(model, batch, pad_id, device)
    rows = list(range(len(batch)))          # original row of each live batch position
    result: list[list[int]] = [[] for _ in batch]
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1, :].argmax(-1)
        keep = _append(nxt, rows, result, eos)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # drop finished rows from the batch and the cache
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            att, nxt = att[sel], nxt[sel]
            rows = [rows[j] for j in keep]
        att = torch.cat([att, att.new_ones((len(rows), 1))], dim=1)
        pos = att.sum(-1, keepdim=True) - 1
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=pos, cache=cache, use_cache=True)
    return result


def contrast_scores(logits_with: torch.Tensor, logits_without: torch.Tensor, alpha: float,
                    plausibility: float) -> torch.Tensor:
    """Profile-contrastive next-token scores [n, V]: log p_w + alpha * (log p_w - log p_wo), where p_w
    conditions on the profile and p_wo does not; tokens with p_w < plausibility * max p_w get -inf."""
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


def _contrast_batch(model, with_p: list[list[int]], without_p: list[list[int]], options: DecodingOptions,
                    eos: set[int], pad_id: int, device, generator=None) -> list[list[int]]:
    """Contrastive continuation ids for one batch: the B with-profile and B profile-free prompts are
    one left-padded batch of 2B rows (rows b and B + b belong together) with one KV cache; each step
    scores with ``contrast_scores``, appends the chosen token to both rows, and drops finished pairs."""
    B = len(with_p)
    out, att, cache = _prefill(model, with_p + without_p, pad_id, device)
    rows = list(range(B))
    result: list[list[int]] = [[] for _ in range(B)]
    for step in range(options.max_new_tokens):
        n = len(rows)
        last = out.logits[:, -1, :]
        nxt = _pick(contrast_scores(last[:n], last[n:], options.contrast_alpha, options.contrast_plausibility),
                    options, generator)
        keep = _append(nxt, rows, result, eos)
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
    return result


def _hf_generate_batch(model, tokenizer, batch: list[list[int]], options: DecodingOptions, eos: set[int],
                       device) -> list[list[int]]:
    ids, att = _left_pad(batch, tokenizer.pad_token_id)
    out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                         **options.generate_kwargs(tokenizer, eos))
    return [_until_end(row, eos) for row in out[:, ids.shape[1]:].tolist()]


def _until_end(row: list[int], eos: set[int]) -> list[int]:
    """The ids before the first end id (``generate`` pads finished rows after it)."""
    for i, t in enumerate(row):
        if t in eos:
            return row[:i]
    return row


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
                      seed: int = 0, contrast_prompts: list[list[int]] | None = None) -> list:
    """One completion per prompt (token ids), batched (``batch_size``, default the options'); decoded
    texts (or the generated ids, EOS excluded, with ``return_ids``) in input order. ``seed`` seeds
    sampling. With ``options.contrast_alpha`` > 0, ``contrast_prompts`` (one per prompt: the same
    request without the profile, or with another user's) is what the profile is contrasted with."""
    batch_size = batch_size or options.batch_size
    if options.contrastive and (contrast_prompts is None or len(contrast_prompts) != len(prompts)):
        raise ValueError("contrast_alpha > 0 needs one contrast prompt per prompt")
    from tqdm.auto import tqdm

    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    gen: list[list[int] | None] = [None] * len(prompts)
    if options.do_sample:
        torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed) if options.do_sample else None
    eos = end_ids(model, tokenizer)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            batch = [prompts[i] for i in idx]
            if options.contrastive:
                res = _contrast_batch(model, batch, [contrast_prompts[i] for i in idx], options, eos,
                                      tokenizer.pad_token_id, device, generator)
            elif options.plain_greedy:
                res = _greedy_batch(model, batch, options.max_new_tokens, eos, tokenizer.pad_token_id, device)
            else:
                res = _hf_generate_batch(model, tokenizer, batch, options, eos, device)
            for i, r in zip(idx, res):
                gen[i] = r
    finally:
        if was_training:
            model.train()
    if return_ids:
        return gen  # type: ignore[return-value]
    return [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen]  # type: ignore[arg-type]


def generate_records(model, tokenizer, records: list[dict], builder, options: DecodingOptions, *,
                     use_profile: bool = True, progress: bool = True, seed: int = 0) -> list[str]:
    """Personalized (or, with ``use_profile=False``, profile-free) generations for records. With
    ``options.contrast_alpha`` > 0 each row is contrasted with its own profile-free prompt."""
    if options.contrastive and not use_profile:
        from .errors import UserError
        raise UserError("--contrast-alpha contrasts the profile with its absence; it needs the profile "
                        "(drop --no-profile)")
    prompts, contrast = [], []
    for r in records:
        e = builder.encode(r, with_response=False)
        prompts.append(e["prompt_with"] if use_profile else e["prompt_without"])
        contrast.append(e["prompt_without"])
    return generate_from_ids(model, tokenizer, prompts, options, progress=progress, seed=seed,
                             contrast_prompts=contrast if options.contrastive else None)


def generate_for(model, tok, records: list[dict], task: str, prompt_opts, options: DecodingOptions, *,
                 use_profile: bool, seed: int = 0, progress: bool = True, stats=None) -> list[str]:
    """Generations for ``records`` with the prompt settings of ``prompt_opts`` (a ``PromptOptions``:
    k, retriever, max_length). Prompts get the profile budget training gives the same record;
    ``stats`` (an ``EncodeStats``) collects how many profiles the length limit cut or removed."""
    builder = prompt_opts.prompt_builder(tok, task, reserve_tokens=options.max_new_tokens)
    if stats is not None:
        builder.stats = stats
    texts = generate_records(model, tok, records, builder, options, use_profile=use_profile,
                             progress=progress, seed=seed)
    builder.stats.warn()
    return texts
