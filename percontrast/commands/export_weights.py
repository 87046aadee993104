"""``percontrast export-weights``: per-token PerCE weights of a dataset, computed once, for other trainers.

    percontrast export-weights --model smollm2-135m --data train.jsonl --task email --output-dir out/weights
    percontrast export-weights ... --formats hf parquet jsonl swift --clip-min 0.8 --clip-max 5

Writes into --output-dir (built in a temp folder beside it and renamed into place, so it is never
half-written):

  dataset/          a Hugging Face dataset (datasets.load_from_disk): per example id, user_id,
                    input_ids (with-profile prompt + response ids, as PerCETrainer sees them),
                    attention_mask, labels (-100 on the prompt), completion_mask, weights (0 on the
                    prompt, clip(PIR, m, M) on the response) and pir (raw, response tokens only)
  weights.parquet   the same rows (--formats parquet); weights.jsonl (--formats jsonl)
  swift.jsonl       ms-swift (>= 4.2.0) messages with a loss_scale per assistant segment:
                    swift sft --dataset out/weights/swift.jsonl --is_binary_loss_scale false ...
  export_info.json  model, dtype, clip, prompt options, counts, what the segment mapping changed

These are OFFLINE weights: this project's refresh=once signal, clip(PIR) estimated ONCE with the
model as given (eval mode, no dropout) before any training. They are NOT the paper's bootstrap,
which re-estimates PIR with the model being trained at every step (percontrast train, the default
--refresh step). See docs/export-weights.md for how to consume each format.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import field
from ..errors import UserError
from ..options import LossOptions, ModelDataOptions, check_clip

FORMATS = ("hf", "parquet", "jsonl", "swift")
SIGNAL = ("refresh=once: clip(PIR, clip_min, clip_max) estimated once with the model as given (eval mode, "
          "no dropout), before any training; NOT the paper's bootstrap, which re-estimates PIR with the "
          "model being trained at every step")
SWIFT_COMMAND = ("swift sft --model MODEL --dataset {path} --is_binary_loss_scale false "
                 "--loss_scale default --template_backend swift")


@dataclass
class ExportWeightsConfig(ModelDataOptions):
    output_dir: str = field("out/weights", help="Folder to create with the exported formats and export_info.json.")
    formats: list[str] = field(default_factory=lambda: ["hf", "swift"],
                               help="What to write, any of: hf (a datasets folder, load_from_disk), parquet, "
                               "jsonl (the same rows), swift (ms-swift messages with per-segment loss_scale).")
    batch_size: int = field(4, help="Examples per forward pass (the same batches as 'percontrast score "
                            "--batch-size N' give bit-identical weights).")
    # the clip is declared once, in LossOptions (copies of its fields: same defaults, help and flags)
    clip_min: float = copy.copy(LossOptions.__dataclass_fields__["clip_min"])
    clip_max: float = copy.copy(LossOptions.__dataclass_fields__["clip_max"])
    allow_negative_clip: bool = copy.copy(LossOptions.__dataclass_fields__["allow_negative_clip"])
    overwrite: bool = field(False, help="Replace an existing --output-dir (atomically, when the new one is complete).")
    progress: bool = field(True, help="Show a progress bar while scoring.")

    def __post_init__(self):
        super().__post_init__()
        if not self.formats:
            raise UserError(f"formats: give at least one of {', '.join(FORMATS)}")
        for f in self.formats:
            if f not in FORMATS:
                raise UserError(f"formats: unknown format {f!r}; choose from {', '.join(FORMATS)}")
        self.formats = list(dict.fromkeys(self.formats))   # a repeated name writes once
        check_clip(self.clip_min, self.clip_max, self.allow_negative_clip)
        if "swift" in self.formats and self.clip_min <= 0:
            # ms-swift turns loss_scale <= 0 into label -100: the token leaves the loss AND the token
            # count n, so its normalization would no longer be PerCE's (n = all response tokens)
            raise UserError(f"formats: swift needs clip_min > 0 (got {self.clip_min}): ms-swift drops tokens with "
                            "loss_scale <= 0 from its token count; use --formats hf/parquet/jsonl for such weights")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")


def run(cfg: ExportWeightsConfig) -> dict:
    import torch

    from ..datasets import load_records
    from ..files import building_dir, refuse_to_replace
    from ..prompts import get_task
    from ..runinfo import run_info
    from ..weights_export import build_export, write_export
    from .score import score_records   # the score command's own loop: the same PIR and clip

    out = Path(cfg.output_dir)
    refuse_to_replace(out, cfg.overwrite)            # before any model work
    records = load_records(cfg.data, get_task(cfg.task), limit=cfg.limit)
    model, tok = cfg.load_model(device="default")
    model.eval()                                     # the weights never see dropout
    builder = cfg.prompt_builder(tok)
    scored = score_records(model, tok, records, builder, batch_size=cfg.batch_size, clip_min=cfg.clip_min,
                           clip_max=cfg.clip_max, progress=cfg.progress)
    builder.stats.warn()
    for s in scored:
        if not all(math.isfinite(v) for v in s["pir"]):
            raise UserError(f"record {s['id']}: the model gives non-finite log-probs (PIR is not a number); "
                            "check the model and --dtype")
    # token_logprobs computes in float32 at least, float64 for a float64 model: store that dtype
    float_dtype = "float64" if next(model.parameters()).dtype == torch.float64 else "float32"
    export = build_export(records, scored, builder, tok, swift="swift" in cfg.formats)

    pirs = [v for s in scored for v in s["pir"]]
    weights = [v for s in scored for v in s["weights"]]
    info = {"format": "percontrast-weights/1", "signal": SIGNAL, "model": cfg.model, "dtype": cfg.dtype,
            "weights_dtype": float_dtype, "clip_min": cfg.clip_min, "clip_max": cfg.clip_max,
            "data": cfg.data, "limit": cfg.limit, "task": cfg.task, "k": cfg.k, "retriever": cfg.retriever,
            "max_length": cfg.max_length, "seed": cfg.seed, "counterfactual_prompt": cfg.counterfactual_prompt,
            "tokenizer": getattr(tok, "name_or_path", None), "pad_token_id": tok.pad_token_id,
            "end_of_turn_id": builder.end_id, "examples": len(scored), "completion_tokens": len(pirs),
            "mean_pir": sum(pirs) / len(pirs), "mean_weight": sum(weights) / len(weights),
            "share_pir_above_min": sum(v > cfg.clip_min for v in pirs) / len(pirs),
            "encode": builder.stats.counts(), "run": run_info(cfg)}
    if "swift" in cfg.formats:
        info["swift"] = {**export.stats.as_dict(), "command": SWIFT_COMMAND.format(path=out / "swift.jsonl"),
                         "end_of_turn": "not a segment: ms-swift appends the template's end-of-turn token "
                                        "itself, with loss_scale 1.0"}
    with building_dir(out, replace=cfg.overwrite) as tmp:
        files = write_export(tmp, export, cfg.formats, info, float_dtype)
    summary = {k: info[k] for k in ("examples", "completion_tokens", "mean_pir", "mean_weight",
                                    "share_pir_above_min", "clip_min", "clip_max")}
    summary.update(output_dir=str(out), files={f: str(out / p) for f, p in files.items()}, signal=SIGNAL)
    if "swift" in cfg.formats:
        summary["swift_merged_tokens"] = export.stats.merged_tokens
    return summary
