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
(one row per example: id, prediction, reference, its scores) and ``summary.json``
(corpus metrics, ``metric_versions()``, ``run_info``).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .config import field
from .errors import DataError, UserError
from .generate import DecodingFields
from .metrics import DEFAULT_METRICS, METRICS
from .options import ModelDataOptions


def check_metrics(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise UserError(f"unknown metric {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"known: {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


@dataclass
class EvalConfig(ModelDataOptions, DecodingFields):
    output_dir: str = field("out/eval", help="Where predictions.json(l) and summary.json go.")
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS),
                               help="Metrics: " + ", ".join(METRICS) + ".")
    predictions: str | None = field(None, help="Score this predictions file (exchange format JSON or JSONL "
                                    "with id/output) instead of generating.")
    overwrite: bool = field(False, help="Replace an existing summary.json in --output-dir.")

    def __post_init__(self):
        super().__post_init__()
        self.check_decoding()
        self.metrics = check_metrics(self.metrics)


# ---------------------------------------------------------------- predictions files

def read_predictions(path: str | Path) -> list[dict]:
    """[{"id": str, "output": str}] from an exchange-format JSON or a JSONL file."""
    from .data import read_rows

    p = Path(path)
    rows = None
    if p.suffix != ".jsonl" and p.is_file():
        try:
            obj = json.loads(p.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if isinstance(obj, dict):
            if not isinstance(obj.get("golds"), list):
                raise DataError("expected the exchange format {\"task\": ..., \"golds\": [{\"id\", \"output\"}]}",
                                file=str(p), field="golds")
            rows = obj["golds"]
    if rows is None:
        rows = read_rows(p)
    out = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"expected an object, got {type(row).__name__}", file=str(p), record=n)
        rid = row.get("id")
        if rid is None or isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise DataError("missing or not a string/integer", file=str(p), record=n, field="id")
        text = row.get("output", row.get("prediction"))
        if text is None:
            text = ""  # an absent prediction is an empty one: it scores 0, it is not dropped
        if not isinstance(text, str):
            raise DataError(f"expected a string, got {type(text).__name__}", file=str(p), record=str(rid),
                            field="output")
        out.append({"id": str(rid), "output": text})
    return out


def align_predictions(predictions: list[dict], gold_ids: list[str], source: str = "predictions") -> list[str]:
    """Prediction texts in gold order. Any missing, extra or duplicated id is ONE UserError
    that lists all of them (at most 10 of each kind shown)."""
    counts = Counter(p["id"] for p in predictions)
    gold = set(gold_ids)
    dup = sorted(i for i, c in counts.items() if c > 1)
    missing = [i for i in gold_ids if i not in counts]
    extra = sorted(i for i in counts if i not in gold)
    if dup or missing or extra:
        def show(ids):
            return ", ".join(ids[:10]) + (f" (+{len(ids) - 10} more)" if len(ids) > 10 else "")
        parts = [f"{what} {len(ids)} id(s): {show(ids)}" for what, ids in
                 (("missing", missing), ("extra", extra), ("duplicated", dup)) if ids]
        raise UserError(f"{source}: prediction ids do not match the gold ids: " + "; ".join(parts))
    by_id = {p["id"]: p["output"] for p in predictions}
    return [by_id[i] for i in gold_ids]


# ---------------------------------------------------------------- scoring / writing

def score(texts: list[str], records: list[dict], metrics: list[str]) -> tuple[list[dict], dict]:
    """Per-example scores and their corpus means (empty predictions score 0)."""
    from .metrics import aggregate, score_examples

    per = score_examples(texts, [r["output"] for r in records], metrics)
    return per, aggregate(per, metrics)


def generate_for(model, tok, records: list[dict], task: str, opts: ModelDataOptions, dec: DecodingFields,
                 *, use_profile: bool, seed: int = 0, progress: bool = True, stats=None) -> list[str]:
    """Generations for ``records`` with the prompt settings of ``opts`` (k, retriever, max_length).
    Prompts get the profile budget training gives the same record; ``stats`` (an ``EncodeStats``)
    collects how many profiles the length limit cut or removed."""
    from .generation import generate_records

    builder = opts.prompt_builder(tok, task, reserve_tokens=dec.max_new_tokens)
    if stats is not None:
        builder.stats = stats
    texts = generate_records(model, tok, records, builder, dec.decoding(seed), use_profile=use_profile,
                             batch_size=dec.batch_size, progress=progress)
    builder.stats.warn()
    return texts


def write_outputs(out: Path, task: str, records: list[dict], texts: list[str], per: list[dict],
                  summary: dict) -> None:
    from .data import write_text_atomic
    from .generate import write_predictions

    write_predictions(out, task, records, texts, [
        {"id": r["id"], "prediction": t, "reference": r["output"], "scores": s}
        for r, t, s in zip(records, texts, per)])
    # summary.json last: its presence means the folder is complete
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))


def run(cfg: EvalConfig) -> dict:
    from .data import load_records
    from .metrics import metric_versions
    from .prompts import get_task
    from .runinfo import run_info

    out = Path(cfg.output_dir)
    if (out / "summary.json").exists() and not cfg.overwrite:
        raise UserError(f"{out}/summary.json exists; pass --overwrite to replace it")
    records = load_records(cfg.data, get_task(cfg.task), limit=cfg.limit,
                           require_profile=not (cfg.no_profile or cfg.predictions))
    t0 = time.perf_counter()
    if cfg.predictions:
        texts = align_predictions(read_predictions(cfg.predictions), [r["id"] for r in records],
                                  source=cfg.predictions)
        source = {"predictions": cfg.predictions}
    else:
        from .models import default_device, load_model

        model, tok = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                device=default_device())
        from .encoding import EncodeStats
        stats = EncodeStats()
        texts = generate_for(model, tok, records, cfg.task, cfg, cfg, use_profile=not cfg.no_profile,
                             seed=cfg.seed, stats=stats)
        source = {"model": cfg.model, "use_profile": not cfg.no_profile, **stats.counts()}
    gen_s = time.perf_counter() - t0
    per, corpus = score(texts, records, cfg.metrics)
    summary = {"task": cfg.task, "data": cfg.data, "examples": len(records), **source,
               "empty_predictions": sum(not t.strip() for t in texts), "metrics": corpus,
               "generation_s": round(gen_s, 2), "metric_versions": metric_versions(), "run": run_info(cfg)}
    write_outputs(out, cfg.task, records, texts, per, summary)
    return {"examples": len(records), "metrics": corpus, "output_dir": str(out)}
