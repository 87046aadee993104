"""Fields shared by the commands' config dataclasses (model, data, prompt building)."""
from __future__ import annotations

from dataclasses import dataclass

from .config import field
from .errors import UserError
from .prompts import COUNTERFACTUAL_PROMPTS, TASKS


@dataclass
class ModelDataOptions:
    model: str = field("smollm2-135m", help="Model: a local checkpoint directory, a built-in name "
                       "(smollm2-135m, tiny-random) or a hub id (used as-is, needs network).")
    data: str = field("", help="Records in the LongLaMP format: a .jsonl/.json/.parquet file, "
                      "builtin:sample-train / builtin:sample-test, or longlamp:<config>[:split] / lamp:... specs.")
    task: str = field("generic", help="Prompt template: " + ", ".join(TASKS) + ".", choices=tuple(TASKS))
    k: int = field(4, help="Profile items retrieved into the prompt (top-k).")
    retriever: str = field("bm25", help="How profile items are ranked: bm25, recent, random, first, "
                           "or dense:<local encoder dir>.")
    max_length: int = field(1024, help="Max tokens of prompt + response; the profile is cut first, then "
                            "the input, and the response only with a counted warning.")
    limit: int | None = field(None, help="Use only the first N records.")
    seed: int = field(0, help="Random seed (retrieval=random, data order, initialization).")
    counterfactual_prompt: str = field(
        "input-only", help="What the profile-free prompt removes: input-only (the profile items AND the "
        "task's instruction sentence that refers to them; the prompt is the input alone) or keep-instruction "
        "(only the items; the instruction stays, so the prompts differ in the items alone).",
        choices=COUNTERFACTUAL_PROMPTS)
    trust_remote_code: bool = field(False, help="Allow model repositories to run their own Python code.")
    dtype: str = field("auto", help="Weights dtype: auto (float32), float32, bfloat16, float16, or "
                       "float64 (slow; for exact numerical checks).",
                       choices=("auto", "float32", "bfloat16", "float16", "float64"))

    def __post_init__(self):
        if not self.data:
            raise UserError("--data is required (a records file, or builtin:sample-train)")
        if self.k < 0:
            raise UserError(f"k must be >= 0, got {self.k}")
        if self.max_length < 8:
            raise UserError(f"max_length must be >= 8, got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be >= 1, got {self.limit}")

    def prompt_builder(self, tokenizer, task: str | None = None, **overrides):
        """The ``PromptBuilder`` these options describe (one place, so every command builds
        prompts the same way); ``task`` overrides ``self.task`` (compare's cross-task eval sets)."""
        from .encoding import PromptBuilder
        from .prompts import get_task
        kw = dict(k=self.k, retriever=self.retriever, max_length=self.max_length, seed=self.seed,
                  counterfactual_prompt=self.counterfactual_prompt)
        kw.update(overrides)
        return PromptBuilder(tokenizer, get_task(task or self.task), **kw)


def check_clip(clip_min: float, clip_max: float, allow_negative: bool = False) -> None:
    if clip_min > clip_max:
        raise UserError(f"clip_min ({clip_min}) must be <= clip_max ({clip_max})")
    if clip_min < 0 and not allow_negative:
        raise UserError(f"clip_min {clip_min} < 0 turns negative-PIR tokens into gradient ascent; "
                        "pass --allow-negative-clip to force it")

