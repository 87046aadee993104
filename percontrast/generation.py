"""Batched personalized generation: left padding, KV cache, greedy by default.

Prompts are sorted by length so that a batch wastes little padding; outputs come back
in input order. Generation stops at the tokenizer's EOS (the chat template's end of
turn for chat models), which is stripped with the other special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodingOptions:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def generate_kwargs(self, tokenizer) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
              "repetition_penalty": self.repetition_penalty, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "use_cache": True}
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        else:  # silence "temperature is set but do_sample=False" from the model's own generation config
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


@torch.no_grad()
def generate_from_ids(model, tokenizer, prompts: list[list[int]], options: DecodingOptions,
                      batch_size: int = 16, progress: bool = True) -> list[str]:
    """Generate one completion per prompt (token ids), batched; returns decoded texts in order."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str | None] = [None] * len(prompts)
    kw = options.generate_kwargs(tokenizer)
    if options.do_sample:
        torch.manual_seed(options.seed)
    for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        L = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), L), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(idx), L), dtype=torch.long)
        for b, i in enumerate(idx):  # left padding: every prompt ends at column L
            ids[b, L - len(prompts[i]):] = torch.tensor(prompts[i])
            att[b, L - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kw)
        for b, i in enumerate(idx):
            texts[i] = tokenizer.decode(out[b, L:], skip_special_tokens=True).strip()
    return texts  # type: ignore[return-value]


def generate_records(model, tokenizer, records: list[dict], builder, options: DecodingOptions, *,
                     use_profile: bool = True, batch_size: int = 16, progress: bool = True) -> list[str]:
    """Personalized (or, with ``use_profile=False``, profile-free) generations for records."""
    prompts = []
    for r in records:
        e = builder.encode(r, with_response=False)
        prompts.append(e["prompt_with"] if use_profile else e["prompt_without"])
    return generate_from_ids(model, tokenizer, prompts, options, batch_size=batch_size, progress=progress)
