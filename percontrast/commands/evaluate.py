"""``percontrast eval``: generate for every example of a data file and score it.

    percontrast eval --model runs/perce --data test.jsonl --task email --output-dir out/eval
    percontrast eval --data test.jsonl --task email --predictions preds.json --output-dir out/eval

Greedy decoding by default; generation stops at the tokenizer's EOS (the chat template's
end of turn), which is stripped. ``--no-profile`` generates from the profile-free prompt
(the counterfactual ablation). ``--predictions FILE`` scores an existing predictions file
instead of generating: the LaMP/LongLaMP exchange format ``{"task", "golds": [{"id",
"output"}]}`` or JSONL rows with ``id`` and ``output`` (or ``prediction``). Its ids must
equal the gold ids exactly (the official LaMP evaluation asserts the same); an empty
prediction scores 0 and is never dropped.

Writes into ``--output-dir``: ``predictions.json`` (exchange format), ``predictions.jsonl``
(one row per example: id, prediction, reference, its scores, and when generated ``new_tokens``
and ``ended``: whether it stopped at an end token before ``--max-new-tokens``) and
``summary.json`` (corpus metrics, ``hit_max_new_tokens``: the share of generations that ran to
``--max-new-tokens`` without an end token, a degeneration signal; ``metric_versions()``,
``run_info``).

``--judge SPEC_OR_URL`` adds the LLM judge of personalization (``percontrast/judge.py``,
docs/judge.md): per example ``judge`` (1-5, sum s*p(s) over the digit tokens, renormalized) and
``judge_mass`` (the probability on the five digits) in ``scores``; their means in the summary's
``metrics``, and a ``judge`` block (back-end, model, prompt version, unscored examples, a note).
The judge is loaded / reached before generating, so a bad judge fails before any work.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import field
from ..errors import UserError
from ..generation import generate_for
from ..metrics import DEFAULT_METRICS, METRICS, check_metrics
from ..options import DecodingOptions, JudgeOptions, ModelDataOptions


@dataclass
class EvalConfig(JudgeOptions, ModelDataOptions, DecodingOptions):   # judge flags listed last
    no_profile: bool = field(False, help="Generate from the profile-free prompt (the counterfactual ablation).")
    output_dir: str = field("out/eval", help="Where predictions.json(l) and summary.json go.")
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS),
                               help="Metrics: " + ", ".join(METRICS) + ".")
    predictions: str | None = field(None, help="Score this predictions file (exchange format JSON or JSONL "
                                    "with id/output) instead of generating.")
    overwrite: bool = field(False, help="Replace an existing summary.json in --output-dir.")

    def __post_init__(self):
        super().__post_init__()
        self.metrics = list(check_metrics(self.metrics))
        if not self.predictions:
            self.refuse_unused_contrast_options()


# ---------------------------------------------------------------- scoring / writing

def score(texts: list[str], records: list[dict], metrics: list[str]) -> tuple[list[dict], dict]:
    """Per-example scores and their corpus means (empty predictions score 0)."""
    from ..metrics import aggregate, score_examples

    per = score_examples(texts, [r["output"] for r in records], metrics)
    return per, aggregate(per, metrics)


def write_outputs(out: Path, task: str, records: list[dict], texts: list[str], per: list[dict],
                  summary: dict, info: list[dict] | None = None) -> None:
    """``info`` (from ``generate_for``): each row also gets ``new_tokens`` and ``ended``."""
    from ..data import write_predictions
    from ..files import write_text_atomic

    ends = info if info is not None else [None] * len(records)
    write_predictions(out, task, records, texts, [
        {"id": r["id"], "prediction": t, "reference": r["output"], "scores": s,
         **({"new_tokens": e["new_tokens"], "ended": e["ended"]} if e is not None else {})}
        for r, t, s, e in zip(records, texts, per, ends)])
    # summary.json last: its presence means the folder is complete
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))


def run(cfg: EvalConfig) -> dict:
    from ..data import align_predictions, read_predictions
    from ..datasets import load_records
    from ..files import refuse_to_replace
    from ..metrics import metric_versions
    from ..prompts import get_task
    from ..runinfo import run_info

    out = Path(cfg.output_dir)
    refuse_to_replace(out / "summary.json", cfg.overwrite)
    records = load_records(cfg.data, get_task(cfg.task), limit=cfg.limit,
                           require_profile=not (cfg.no_profile or cfg.predictions))
    judge = cfg.make_judge(cfg.trust_remote_code)   # before generating: a bad judge costs nothing
    t0 = time.perf_counter()
    info: list[dict] | None = None
    if cfg.predictions:
        texts = align_predictions(read_predictions(cfg.predictions), [r["id"] for r in records],
                                  source=cfg.predictions)
        source = {"predictions": cfg.predictions}
    else:
        model, tok = cfg.load_model(device="default")
        from ..encoding import EncodeStats
        from ..generation import hit_max_share
        stats = EncodeStats()
        info = []
        texts = generate_for(model, tok, records, cfg.task, cfg, cfg, use_profile=not cfg.no_profile,
                             seed=cfg.seed, stats=stats, info=info)
        source = {"model": cfg.model, "use_profile": not cfg.no_profile, **stats.counts(),
                  "hit_max_new_tokens": hit_max_share(info)}
    gen_s = time.perf_counter() - t0
    per, corpus = score(texts, records, cfg.metrics)
    judged = {}
    if judge is not None:
        from ..judge import judge_into
        judged = {"judge": judge_into(judge, get_task(cfg.task), records, texts, cfg, per, corpus)}
    summary = {"task": cfg.task, "data": cfg.data, "examples": len(records), **source,
               "empty_predictions": sum(not t.strip() for t in texts), "metrics": corpus, **judged,
               "generation_s": round(gen_s, 2), "metric_versions": metric_versions(), "run": run_info(cfg)}
    write_outputs(out, cfg.task, records, texts, per, summary, info)
    return {"examples": len(records), "metrics": corpus, "output_dir": str(out)}
