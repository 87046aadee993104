"""``percontrast generate``: personalized generation for a data file, written as predictions.

    percontrast generate --model runs/perce --data test.jsonl --task email --output-dir out/gen

Writes ``predictions.json`` in the LaMP/LongLaMP exchange format
(``{"task": ..., "golds": [{"id", "output"}]}``) and ``predictions.jsonl`` (one row per
example with its prompt input).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import field
from .errors import UserError
from .options import ModelDataOptions


@dataclass
class DecodingFields:
    max_new_tokens: int = field(128, help="Max tokens generated per example.")
    do_sample: bool = field(False, help="Sample instead of greedy decoding.")
    temperature: float = field(1.0, help="Sampling temperature (with --do-sample).")
    top_p: float = field(1.0, help="Nucleus sampling mass (with --do-sample).")
    repetition_penalty: float = field(1.0, help="Repetition penalty (1.0: none).")
    batch_size: int = field(16, help="Prompts generated together (left-padded, KV cache).")
    no_profile: bool = field(False, help="Generate from the profile-free prompt (the counterfactual ablation).")

    def decoding(self, seed: int = 0):
        from .generation import DecodingOptions
        return DecodingOptions(self.max_new_tokens, self.do_sample, self.temperature, self.top_p,
                               self.repetition_penalty, seed)

    def check_decoding(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise UserError("max_new_tokens and batch_size must be >= 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise UserError("need temperature > 0, 0 < top_p <= 1, repetition_penalty > 0")


@dataclass
class GenerateConfig(ModelDataOptions, DecodingFields):
    output_dir: str = field("out/generate", help="Where predictions.json(l) go.")
    overwrite: bool = field(False, help="Replace existing predictions.")

    def __post_init__(self):
        super().__post_init__()
        self.check_decoding()


def write_predictions(out: Path, task: str, records: list[dict], texts: list[str], rows: list[dict]) -> None:
    """``predictions.json`` in the LaMP/LongLaMP exchange format, plus one JSONL row per example."""
    from .data import write_jsonl_atomic, write_text_atomic

    golds = [{"id": r["id"], "output": t} for r, t in zip(records, texts)]
    write_text_atomic(out / "predictions.json", json.dumps({"task": task, "golds": golds}, ensure_ascii=False,
                                                           indent=1))
    write_jsonl_atomic(out / "predictions.jsonl", rows)


def run(cfg: GenerateConfig) -> dict:
    from .data import load_records
    from .evaluate import generate_for
    from .models import default_device, load_model
    from .prompts import get_task

    out = Path(cfg.output_dir)
    if (out / "predictions.json").exists() and not cfg.overwrite:
        raise UserError(f"{out}/predictions.json exists; pass --overwrite to replace it")
    records = load_records(cfg.data, get_task(cfg.task), require_output=False, limit=cfg.limit)
    model, tok = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                            device=default_device())
    texts = generate_for(model, tok, records, cfg.task, cfg, cfg, use_profile=not cfg.no_profile, seed=cfg.seed)
    write_predictions(out, cfg.task, records, texts,
                      [{"id": r["id"], "input": r["input"], "prediction": t} for r, t in zip(records, texts)])
    return {"examples": len(records), "output_dir": str(out)}
