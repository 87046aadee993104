"""``percontrast generate``: personalized generation for a data file, written as predictions.

    percontrast generate --model runs/perce --data test.jsonl --task email --output-dir out/gen

Writes ``predictions.json`` in the LaMP/LongLaMP exchange format
(``{"task": ..., "golds": [{"id", "output"}]}``) and ``predictions.jsonl`` (one row per
example with its prompt input).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import field
from ..errors import UserError
from ..options import DecodingOptions, ModelDataOptions


@dataclass
class GenerateConfig(ModelDataOptions, DecodingOptions):
    no_profile: bool = field(False, help="Generate from the profile-free prompt (the counterfactual ablation).")
    output_dir: str = field("out/generate", help="Where predictions.json(l) go.")
    overwrite: bool = field(False, help="Replace existing predictions.")


def run(cfg: GenerateConfig) -> dict:
    from ..data import write_predictions
    from ..datasets import load_records
    from ..files import refuse_to_replace
    from ..generation import generate_for
    from ..prompts import get_task

    out = Path(cfg.output_dir)
    refuse_to_replace(out / "predictions.json", cfg.overwrite)
    records = load_records(cfg.data, get_task(cfg.task), require_output=False, limit=cfg.limit)
    model, tok = cfg.load_model(device="default")
    texts = generate_for(model, tok, records, cfg.task, cfg, cfg, use_profile=not cfg.no_profile, seed=cfg.seed)
    write_predictions(out, cfg.task, records, texts,
                      [{"id": r["id"], "input": r["input"], "prediction": t} for r, t in zip(records, texts)])
    return {"examples": len(records), "output_dir": str(out)}
