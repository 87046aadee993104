"""``percontrast score``: per-token PIR of every example, to JSON and an HTML heatmap.

    percontrast score --model smollm2-135m --data builtin:sample-test --task email --output-dir out/score

Writes ``scores.json`` (per example: tokens, PIR, both log-probs, entropy, PerCE
weight) and ``heatmap.html``. ``--counterfactual swap`` replaces the profile with
another user's instead of removing it (separates "this user" from "any context").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import field
from ..errors import UserError
from ..options import ModelDataOptions, check_clip


@dataclass
class ScoreConfig(ModelDataOptions):
    output_dir: str = field("out/score", help="Where scores.json and heatmap.html go.")
    batch_size: int = field(4, help="Examples per forward pass.")
    clip_min: float = field(0.8, help="m, to report the PerCE weight clip(PIR, m, M) of each token.")
    clip_max: float = field(5.0, help="M, to report the PerCE weight clip(PIR, m, M) of each token.")
    counterfactual: str = field("remove", help="The intervention: remove the profile (the paper; see "
                                "--counterfactual-prompt for exactly what goes) or swap in another user's "
                                "profile (PIR = log p(y | own profile) - log p(y | another user's)).",
                                choices=("remove", "swap"))
    html: bool = field(True, help="Also write heatmap.html.")
    overwrite: bool = field(False, help="Replace existing scores.json / heatmap.html.")

    def __post_init__(self):
        super().__post_init__()
        check_clip(self.clip_min, self.clip_max, allow_negative=True)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")


def score_records(model, tokenizer, records: list[dict], builder, *, batch_size: int = 4,
                  clip_min: float = 0.8, clip_max: float = 5.0, profiles: list[list[dict]] | None = None,
                  progress: bool = True) -> list[dict]:
    """Per-example token scores (lists of floats), in record order."""
    import torch
    from tqdm.auto import tqdm

    from ..encoding import PairedCollator
    from ..losses import clip_weights
    from ..scoring import score_batch

    model.eval()
    collate = PairedCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    results = []
    for start in tqdm(range(0, len(records), batch_size), desc="scoring", disable=not progress, leave=False):
        chunk = records[start:start + batch_size]
        # swap: the counterfactual prompt holds another user's profile instead of none
        enc = [builder.encode(r, counterfactual_profile=None if profiles is None else profiles[start + i])
               for i, r in enumerate(chunk)]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(enc).items()}
        s = score_batch(model, batch)
        pir = s.pir
        w = clip_weights(pir, clip_min, clip_max)
        for b, (r, e) in enumerate(zip(chunk, enc)):
            n = len(e["response"])
            results.append({
                "id": r["id"], "input": r["input"], "output": r["output"],
                "tokens": [tokenizer.decode([t]) for t in e["response"]], "token_ids": e["response"],
                "pir": pir[b, :n].tolist(), "logp_with": s.logp_with[b, :n].tolist(),
                "logp_without": s.logp_without[b, :n].tolist(), "entropy": s.entropy[b, :n].tolist(),
                "weights": w[b, :n].tolist(), "n_profile_items": e["n_profile_items"],
                "profile_removed": e["profile_removed"]})
    return results


def run(cfg: ScoreConfig) -> dict:
    from ..datasets import load_records
    from ..files import write_text_atomic
    from ..heatmap import render
    from ..prompts import get_task
    from ..retrieval import other_user_profiles
    from ..runinfo import run_info

    out = Path(cfg.output_dir)
    targets = [out / "scores.json"] + ([out / "heatmap.html"] if cfg.html else [])
    if not cfg.overwrite and any(t.exists() for t in targets):
        raise UserError(f"{out} already has scores; pass --overwrite to replace them")
    task = get_task(cfg.task)
    records = load_records(cfg.data, task, limit=cfg.limit)
    model, tok = cfg.load_model(device="default")
    builder = cfg.prompt_builder(tok)
    profiles = other_user_profiles(records, cfg.seed) if cfg.counterfactual == "swap" else None
    results = score_records(model, tok, records, builder, batch_size=cfg.batch_size, clip_min=cfg.clip_min,
                            clip_max=cfg.clip_max, profiles=profiles)
    all_pir = [v for r in results for v in r["pir"]]
    summary = {"examples": len(results), "tokens": len(all_pir),
               "mean_pir": sum(all_pir) / len(all_pir),
               "share_pir_above_min": sum(v > cfg.clip_min for v in all_pir) / len(all_pir),
               "counterfactual": cfg.counterfactual, "counterfactual_prompt": cfg.counterfactual_prompt,
               **builder.stats.counts()}
    builder.stats.warn()
    payload = {"summary": summary, "run": run_info(cfg), "examples": results}
    write_text_atomic(out / "scores.json", json.dumps(payload, ensure_ascii=False))
    if cfg.html:
        write_text_atomic(out / "heatmap.html", render(results, title=f"PerContrast scores: {cfg.model}"))
    return summary
