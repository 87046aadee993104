"""Turn records into token ids for the two passes, and batch them.

For each record: the with-profile prompt ids, the counterfactual (profile-free) prompt
ids and the response ids. The response is tokenized ON ITS OWN and appended to both
prompts as ids, so its ids are byte-for-byte the same in both passes (tokenizing
prompt+response as one string can merge tokens across the boundary).

Too long? The profile is cut first (fewer words of retrieved items, latest-ranked
first), then the input (the same cut in both prompts), and only then the response,
which is counted in ``EncodeStats`` and warned about, never cut silently. A profile cut
to nothing is counted apart (``profile_removed``): both prompts are then the same, PIR is
0 on every token and PerCE degrades to ``clip_min`` x CE for that example.

The prompt budget is ``max_length`` minus the gold response's length whether or not the
response is returned, so a generation prompt keeps exactly the profile text that training
(and scoring) keep for the same record. A record without a gold output reserves
``reserve_tokens`` (the generation length) instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .prompts import (COUNTERFACTUAL_PROMPTS, Task, counterfactual_prompt, personalized_prompt, profile_parts,
                      profile_words, shown_items)
from .retrieval import retrieve_for

logger = logging.getLogger(__name__)


@dataclass
class EncodeStats:
    examples: int = 0
    profile_cut: int = 0         # profile shortened (includes profile_removed)
    profile_removed: int = 0     # profile cut to nothing: PIR is 0 everywhere for these
    input_cut: int = 0
    response_cut: int = 0
    response_tokens_dropped: int = 0

    def counts(self) -> dict[str, int]:
        """For results files: how many examples the length limit changed, and how."""
        return {"examples_encoded": self.examples, "profile_cut": self.profile_cut,
                "profile_removed": self.profile_removed, "input_cut": self.input_cut,
                "response_cut": self.response_cut}

    def warn(self) -> None:
        if self.response_cut:
            logger.warning("max_length cut the RESPONSE of %d/%d examples (%d tokens dropped); raise max_length",
                           self.response_cut, self.examples, self.response_tokens_dropped)
        if self.profile_removed:
            logger.warning("max_length removed the WHOLE profile of %d/%d examples: both prompts are the same, "
                           "their PIR is 0 and PerCE weights every token clip_min; raise max_length or lower k",
                           self.profile_removed, self.examples)
        if self.profile_cut or self.input_cut:
            logger.info("max_length: profile cut in %d, input cut in %d of %d examples",
                        self.profile_cut, self.input_cut, self.examples)


_SENTINEL = "PERCONTRAST-END-OF-RESPONSE-7f3a"


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes an assistant turn in the tokenizer's chat template (ChatML's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``), found by rendering a turn with a sentinel
    answer; the tokenizer's EOS when there is no template or it shows no special token there.
    Training targets end with it, so a fine-tuned model learns to close its turn the way the
    template (and therefore generation) expects."""
    eos = tokenizer.eos_token_id
    if not getattr(tokenizer, "chat_template", None):
        return eos
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
            tokenize=False, enable_thinking=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation: fall back to EOS
        return eos
    at = text.find(_SENTINEL)
    if at < 0:
        return eos
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for tid in tokenizer(text[at + len(_SENTINEL):], add_special_tokens=False)["input_ids"]:
        if tid in special:
            return tid
        if tokenizer.decode([tid]).strip():   # ordinary text before any special token: no marker
            break
    return eos


@dataclass
class PromptBuilder:
    """Renders both prompts of a record and tokenizes them (chat template when the tokenizer has one)."""
    tokenizer: object
    task: Task
    k: int = 4
    retriever: str = "bm25"
    max_length: int = 1024
    seed: int = 0
    use_chat_template: bool | None = None     # None: use it when the tokenizer has one
    system_prompt: str | None = None
    counterfactual_prompt: str = "input-only"  # see prompts.COUNTERFACTUAL_PROMPTS
    reserve_tokens: int = 0                    # budget kept for a response a record does not have
    stats: EncodeStats = field(default_factory=EncodeStats)

    def __post_init__(self):
        if self.use_chat_template is None:
            self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        if self.counterfactual_prompt not in COUNTERFACTUAL_PROMPTS:
            raise UserError(f"counterfactual_prompt must be one of {', '.join(COUNTERFACTUAL_PROMPTS)}, "
                            f"got {self.counterfactual_prompt!r}")
        self.end_id = end_of_turn_id(self.tokenizer) if self.use_chat_template else self.tokenizer.eos_token_id

    # -- text -> ids ---------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        if self.use_chat_template:
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            msgs.append({"role": "user", "content": text})
            # enable_thinking=False: templates with a thinking switch (Qwen3) then open the answer
            # directly, so untrained and fine-tuned models answer in the same format; a template
            # without the switch ignores the unused variable.
            rendered = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                          enable_thinking=False)
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text + "\n", add_special_tokens=True)["input_ids"]

    def response_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + ([self.end_id] if self.end_id is not None else [])

    def profile_items(self, record: dict, profile: list[dict] | None = None) -> list[dict]:
        return retrieve_for(self.task, record, self.k, self.retriever, self.seed, profile)

    # -- the pair --------------------------------------------------------------
    def encode(self, record: dict, *, with_response: bool = True, profile: list[dict] | None = None,
               counterfactual_profile: list[dict] | None = None) -> dict:
        """ids for one record: ``prompt_with``, ``prompt_without``, ``response`` (+ bookkeeping).

        ``profile`` replaces the record's own profile in the with-profile prompt.
        ``counterfactual_profile`` puts that profile (another user's) into the counterfactual
        prompt instead of removing the profile (the "swap" intervention).
        """
        self.stats.examples += 1
        items = self.profile_items(record, profile)
        gold = record.get("output")
        resp = self.response_ids(gold) if gold else []
        # The budget never depends on with_response: generation sees the profile training saw.
        budget = self.max_length - (len(resp) if resp else self.reserve_tokens)
        x = record["input"]

        def with_ids(pw, iw):
            return self.prompt_ids(personalized_prompt(self.task, items, x, pw, iw))

        pw = iw = None
        p_with = with_ids(None, None)
        if len(p_with) > budget:
            self.stats.profile_cut += 1
            pw = _largest_fitting(lambda w: len(with_ids(w, None)) <= budget, profile_words(self.task, items))
            if pw is None:  # even with no profile text the input does not fit: cut the input too
                self.stats.input_cut += 1
                pw = 0
                iw = _largest_fitting(lambda w: len(with_ids(0, w)) <= budget, len(x.split())) or 0
            p_with = with_ids(pw, iw)
        removed = pw == 0 and bool(items)
        self.stats.profile_removed += removed
        if len(p_with) + min(len(resp), 1) > self.max_length:
            raise UserError(f"record {record['id']}: max_length {self.max_length} is shorter than the prompt "
                            f"template with an empty profile and input ({len(p_with)} tokens); raise --max-length")
        p_without = self._counterfactual_ids(record, counterfactual_profile, iw, budget)
        over = len(p_with) + len(resp) - self.max_length
        if over > 0:
            if with_response:
                self.stats.response_cut += 1
                self.stats.response_tokens_dropped += over
            resp = resp[: max(1, len(resp) - over)]
        return {"id": str(record["id"]), "prompt_with": p_with, "prompt_without": p_without,
                "response": resp if with_response else [], "n_profile_items": len(items),
                "profile_removed": removed,
                # the user turn as text, before any chat template (a text-level export needs it)
                "prompt_with_text": personalized_prompt(self.task, items, x, pw, iw),
                # the items as they stand in the with-profile prompt, after retrieval and any cut:
                # rendered (profile_shown) and as records (profile_items_shown: copy rate, copy baseline)
                "profile_shown": profile_parts(self.task, items, pw),
                "profile_items_shown": shown_items(self.task, items, pw)}

    def _counterfactual_ids(self, record: dict, other: list[dict] | None, iw: int | None, budget: int) -> list[int]:
        """The counterfactual prompt with the same input cut as the with-profile prompt: the profile
        removed (``counterfactual_prompt`` says whether the task instruction goes too), or another
        user's profile, cut to the same budget on its own."""
        x = record["input"]
        if other is None:
            return self.prompt_ids(counterfactual_prompt(
                self.task, x, iw, keep_instruction=self.counterfactual_prompt == "keep-instruction"))
        items = self.profile_items(record, other)

        def ids(pw):
            return self.prompt_ids(personalized_prompt(self.task, items, x, pw, iw))

        full = ids(None)
        if len(full) <= budget:
            return full
        return ids(_largest_fitting(lambda w: len(ids(w)) <= budget, profile_words(self.task, items)) or 0)


def _largest_fitting(fits, hi: int) -> int | None:
    """Largest w in [0, hi] with fits(w) (fits is monotone decreasing in w); None if fits(0) fails."""
    if not fits(0):
        return None
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def pad_aligned(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch with every response starting at the same column P (prompts left-padded,
    responses right-padded): ``[pad.. prompt | response ..pad]``.

    Then the logits that predict the responses are the same window [P-1, P-1+R) for
    every row, so the LM head runs on R positions only (``logits_to_keep``), and the
    two passes line up token for token. Position ids skip the left padding so that
    each row computes exactly what it would unpadded.
    """
    P = max(len(p) for p in prompts)
    R = max(len(r) for r in responses)
    B = len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    att = torch.zeros((B, P + R), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = p + r
        ids[b, P - len(p): P - len(p) + len(seq)] = torch.tensor(seq, dtype=torch.long)
        att[b, P - len(p): P - len(p) + len(seq)] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": att, "position_ids": pos, "resp_start": torch.tensor(P)}


@dataclass
class PairedCollator:
    """Collates encoded pairs. The stock collators drop extra columns, so this one carries both
    sequences: with-profile (``input_ids``, ...) and counterfactual (``cf_input_ids``, ...), the
    shared targets ``response_ids`` / ``response_mask`` [B, R], ``labels`` (-100 outside the
    response, so the Trainer counts response tokens for ``num_items_in_batch``), and ``idx``."""
    pad_token_id: int
    with_counterfactual: bool = True

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        resp = [f["response"] for f in features]
        R = max(len(r) for r in resp)
        out = pad_aligned([f["prompt_with"] for f in features], resp, self.pad_token_id)
        if self.with_counterfactual:
            cf = pad_aligned([f["prompt_without"] for f in features], resp, self.pad_token_id)
            out.update({f"cf_{k}": v for k, v in cf.items()})
        targets = torch.zeros((len(resp), R), dtype=torch.long)
        mask = torch.zeros((len(resp), R), dtype=torch.long)
        for b, r in enumerate(resp):
            targets[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = 1
        P = int(out["resp_start"])
        labels = torch.full_like(out["input_ids"], -100)
        labels[:, P:] = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
        out.update(response_ids=targets, response_mask=mask, labels=labels,
                   idx=torch.tensor([int(f.get("idx", i)) for i, f in enumerate(features)]))
        return out


def encode_all(builder: PromptBuilder, records: list[dict], *, with_response: bool = True,
               desc: str = "encoding") -> list[dict]:
    """Encode every record (with a progress bar), tagging each with its row index ``idx``."""
    from tqdm.auto import tqdm

    out = []
    for i, r in enumerate(tqdm(records, desc=desc, disable=len(records) < 50, leave=False)):
        e = builder.encode(r, with_response=with_response)
        e["idx"] = i
        out.append(e)
    builder.stats.warn()
    return out


# Length grouping (``train --group-by-length``). A batch costs its widest row in each pass:
# B x (max prompt + max response) columns of the aligned layout, with-profile and counterfactual
# alike, and the two passes share the response part. On the study's data (k=1, max_length 256)
# prompt and response lengths are ANTI-correlated (a long mail leaves less budget for the
# profile), so one scalar key such as prompt+response groups poorly (email: padding/real 0.32 ->
# 0.22); sorting by the response (which both passes share) and then, in runs of a few steps, by
# the with-profile prompt brings it to ~0.06 (benchmarks/NOTES.md, "Training cost per step").
GROUP_MEGABATCH_STEPS = 50   # steps per shuffled pool, the stock LengthGroupedSampler's cap
GROUP_PROMPT_RUN_STEPS = 4   # steps per run sorted by prompt length (measured: 3-8 are within 0.01)


def length_grouped_order(rows: list[dict], global_batch: int, seed: int, epoch: int = 0) -> list[int]:
    """An epoch's order of ``rows`` (encoded examples) in which each consecutive slice of
    ``global_batch`` (one optimizer step: batch x grad_accum x processes) holds similar lengths.

    Every index appears exactly once. Randomness is a generator seeded by (seed, epoch) alone,
    so every process computes the same order and a resumed run finds it again. The order
    depends on the global batch only, never on how a step is split into micro-batches or
    processes, so 2 processes x batch 2 see the same steps as 1 x batch 4 (each rank takes
    its micro-batches of a step; ``accelerate``'s BatchSamplerShard hands rank p the
    micro-batches p, p+W, ... of this order).

    1. A random permutation, cut into pools of ``GROUP_MEGABATCH_STEPS`` steps (the randomness of
       which examples can meet; the stock sampler's rule: at most 50, at least ~4 pools).
    2. Each pool sorted by response length, then each run of ``GROUP_PROMPT_RUN_STEPS`` steps of it
       sorted by with-profile prompt length.
    3. The full steps shuffled (so long and short steps are spread over the epoch: no
       long-to-short sweep inside a pool); a short last step stays last, because every later
       micro-batch would otherwise straddle two steps.
    """
    n, G = len(rows), int(global_batch)
    if G < 1:
        raise ValueError(f"global_batch must be >= 1, got {G}")
    # seed and epoch mixed so that (seed 1, epoch 0) is not (seed 0, epoch 1)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    resp = [len(r["response"]) for r in rows]
    prompt = [len(r["prompt_with"]) for r in rows]
    perm = torch.randperm(n, generator=gen).tolist()
    pool_steps = max(1, min(GROUP_MEGABATCH_STEPS, n // (4 * G)))
    order: list[int] = []
    for a in range(0, n, pool_steps * G):
        pool = sorted(perm[a:a + pool_steps * G], key=lambda i: resp[i])   # stable: ties keep the permutation
        run = GROUP_PROMPT_RUN_STEPS * G
        for b in range(0, len(pool), run):
            order += sorted(pool[b:b + run], key=lambda i: prompt[i])
    steps = [order[s:s + G] for s in range(0, n, G)]
    tail = [steps.pop()] if steps and len(steps[-1]) < G else []
    return [i for s in torch.randperm(len(steps), generator=gen).tolist() for i in steps[s]] + \
        [i for t in tail for i in t]
