"""Turn records into token ids for the two passes, and batch them.

For each record: the with-profile prompt ids, the counterfactual (profile-free) prompt
ids and the response ids. The response is tokenized ON ITS OWN and appended to both
prompts as ids, so its ids are byte-for-byte the same in both passes (tokenizing
prompt+response as one string can merge tokens across the boundary).

Too long? The profile is cut first (fewer words of retrieved items, latest-ranked
first), then the input (the same cut in both prompts), and only then the response,
which is counted in ``EncodeStats`` and warned about, never cut silently.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .prompts import Task, counterfactual_prompt, personalized_prompt, profile_words, query_text
from .retrieval import retrieve

logger = logging.getLogger(__name__)


@dataclass
class EncodeStats:
    examples: int = 0
    profile_cut: int = 0
    input_cut: int = 0
    response_cut: int = 0
    response_tokens_dropped: int = 0

    def warn(self) -> None:
        if self.response_cut:
            logger.warning("max_length cut the RESPONSE of %d/%d examples (%d tokens dropped); raise max_length",
                           self.response_cut, self.examples, self.response_tokens_dropped)
        if self.profile_cut or self.input_cut:
            logger.info("max_length: profile cut in %d, input cut in %d of %d examples",
                        self.profile_cut, self.input_cut, self.examples)


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
    stats: EncodeStats = field(default_factory=EncodeStats)

    def __post_init__(self):
        if self.use_chat_template is None:
            self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    # -- text -> ids ---------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        if self.use_chat_template:
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            msgs.append({"role": "user", "content": text})
            rendered = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text + "\n", add_special_tokens=True)["input_ids"]

    def response_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id  # the chat template's end-of-turn for SmolLM2 / Qwen-style templates
        return ids + ([eos] if eos is not None else [])

    def profile_items(self, record: dict, profile: list[dict] | None = None) -> list[dict]:
        profile = record["profile"] if profile is None else profile
        return retrieve(self.task, query_text(self.task, record["input"]), profile, self.k,
                        self.retriever, record_id=str(record["id"]), seed=self.seed)

    # -- the pair --------------------------------------------------------------
    def encode(self, record: dict, *, with_response: bool = True, profile: list[dict] | None = None) -> dict:
        """ids for one record: ``prompt_with``, ``prompt_without``, ``response`` (+ bookkeeping).

        ``profile`` replaces the record's own profile (the "other user's profile" intervention).
        """
        self.stats.examples += 1
        items = self.profile_items(record, profile)
        resp = self.response_ids(record["output"]) if with_response else []
        budget = self.max_length - len(resp)

        def build(pw, iw):
            return (self.prompt_ids(personalized_prompt(self.task, items, record["input"], pw, iw)),
                    self.prompt_ids(counterfactual_prompt(self.task, record["input"], iw)))

        p_with, p_without = build(None, None)
        if len(p_with) > budget:
            pw = _largest_fitting(lambda w: len(build(w, None)[0]) <= budget, profile_words(self.task, items))
            if pw is not None:
                self.stats.profile_cut += 1
                p_with, p_without = build(pw, None)
            else:  # even with no profile text the input does not fit: cut the input too
                self.stats.profile_cut += 1
                self.stats.input_cut += 1
                iw = _largest_fitting(lambda w: len(build(0, w)[0]) <= budget, len(record["input"].split()))
                p_with, p_without = build(0, iw or 0)
        if len(p_with) + min(len(resp), 1) > self.max_length:
            raise UserError(f"record {record['id']}: max_length {self.max_length} is shorter than the prompt "
                            f"template with an empty profile and input ({len(p_with)} tokens); raise --max-length")
        over = len(p_with) + len(resp) - self.max_length
        if over > 0 and with_response:
            self.stats.response_cut += 1
            self.stats.response_tokens_dropped += over
            resp = resp[: max(1, len(resp) - over)]
        return {"id": str(record["id"]), "prompt_with": p_with, "prompt_without": p_without, "response": resp,
                "n_profile_items": len(items)}


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
