"""``percontrast demo``: the Quick start, end to end on the built-in model and sample.

1. Score the held-out sample messages with SmolLM2-135M-Instruct: per-token PIR,
   written to ``heatmap_before.html``.
2. Fine-tune briefly with PerCE on the sample's training messages.
3. Score again (``heatmap_after.html``) and print before/after numbers on the held-out
   messages: NLL per token with and without the profile, mean PIR, share of tokens with
   PIR above m, and ROUGE-L of greedy generations (3-gram ban, as the study decodes).
The sample is 6 hand-written users x 6 short messages; it shows the mechanics, it is
far too small to say anything about the method's quality.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import field
from ..errors import UserError
from ..losses import METHODS
from ..options import ModelOptions


DEMO_NGRAM_BAN = 3   # the study's decoding (results/study: chosen on validation, untrained model)


@dataclass
class DemoConfig(ModelOptions):
    output_dir: str = field("demo-output", help="Where heatmaps, the fine-tuned model and demo.json go.")
    method: str = field("perce", help="Training loss for the short fine-tune.",
                        choices=METHODS)
    epochs: float = field(3.0, help="Epochs over the 24 training messages.")
    learning_rate: float = field(5e-5, help="Learning rate of the short full fine-tune.")
    batch_size: int = field(4, help="Batch size.")
    k: int = field(3, help="Profile items in each prompt.")
    generate: bool = field(True, help="Also generate for the held-out messages and report ROUGE-L.")
    overwrite: bool = field(True, help="Replace a previous demo's output.")

    def __post_init__(self):
        super().__post_init__()
        if self.epochs <= 0 or self.learning_rate <= 0 or self.batch_size < 1 or self.k < 1:
            raise UserError("demo needs epochs > 0, learning_rate > 0, batch_size >= 1, k >= 1")


def _summary(results: list[dict], clip_min: float) -> dict:
    toks = [(w, wo, p) for r in results for w, wo, p in zip(r["logp_with"], r["logp_without"], r["pir"])]
    n = len(toks)
    return {"nll_with_profile": -sum(t[0] for t in toks) / n, "nll_without_profile": -sum(t[1] for t in toks) / n,
            "mean_pir": sum(t[2] for t in toks) / n, "share_pir_above_min": sum(t[2] > clip_min for t in toks) / n}


def _rouge_l(preds: list[str], refs: list[str]) -> float | None:
    try:
        from ..metrics import aggregate, score_examples
    except ImportError:
        return None
    return aggregate(score_examples(preds, refs, metrics=("rougeL",)), metrics=("rougeL",))["rougeL"]


def run(cfg: DemoConfig) -> dict:
    import shutil

    import transformers

    from ..datasets import load_records
    from ..files import write_text_atomic
    from ..generation import generate_records
    from ..heatmap import render
    from ..options import DecodingOptions
    from ..prompts import get_task
    from ..runinfo import run_info
    from .report import ProgressLineCallback, ReportConfig
    from .report import run as write_report
    from .score import score_records
    from .train import TrainConfig, build_trainer

    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise UserError(f"{out} is not empty; pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    task = get_task("email")
    train = load_records("builtin:sample-train", task)
    test = load_records("builtin:sample-test", task)
    # The fine-tune's config also describes the model and the prompts the demo scores with.
    tcfg = TrainConfig(model=cfg.model, data="builtin:sample-train", task="email", method=cfg.method, k=cfg.k,
                       epochs=cfg.epochs, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
                       output_dir=str(out / "model"), save_total_limit=1, logging_steps=2, progress=False,
                       dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    t0 = time.perf_counter()
    print(f"[1/4] loading {cfg.model} (the first run converts the GGUF weights once, ~1 min) ...", flush=True)
    transformers.set_seed(0)
    model, tok = tcfg.load_model()
    builder = tcfg.prompt_builder(tok)
    # Decoded as the study decodes: greedy with the 3-gram ban. Without it the 135M model loops
    # after training ("Cheers, Maria, ... Cheers, Maria"); the ban counts only the generated tokens.
    decoding = DecodingOptions(max_new_tokens=48, batch_size=12, no_repeat_ngram_size=DEMO_NGRAM_BAN)

    def measure(tag: str) -> dict:
        res = score_records(model, tok, test, builder, progress=False, top_k=5)   # top-5 for the explorer
        write_text_atomic(out / f"heatmap_{tag}.html", render(res, title=f"PIR {tag} PerCE fine-tuning ({cfg.model})"))
        s = _summary(res, 0.8)
        if cfg.generate:
            preds = generate_records(model, tok, test, builder, decoding, progress=False)
            s["rougeL"] = _rouge_l(preds, [r["output"] for r in test])
            s["example_generation"] = {"id": test[0]["id"], "prediction": preds[0], "gold": test[0]["output"]}
        return s

    print("[2/4] scoring the 12 held-out messages (before) ...", flush=True)
    before = measure("before")
    print(f"[3/4] fine-tuning with {cfg.method} on 24 messages ({cfg.epochs:g} epochs) ...", flush=True)
    trainer, _ = build_trainer(tcfg, model, tok, train, callbacks=[ProgressLineCallback()])
    t_train = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t_train
    trainer.save_model(str(out / "model"))
    # the run's log in train's results format, so `percontrast report` draws its curves
    write_text_atomic(out / "model" / "train_results.json", json.dumps(
        {"method": cfg.method, "steps": trainer.state.global_step, "wall_s": round(t_train, 2),
         "log": [h for h in trainer.state.log_history if "loss" in h], "run": run_info(tcfg)}, indent=2, default=str))
    report = write_report(ReportConfig(run_dir=str(out / "model")))["report"]
    print("[4/4] scoring again (after) ...", flush=True)
    after = measure("after")
    result = {"model": cfg.model, "method": cfg.method, "train_steps": trainer.state.global_step,
              "train_wall_s": round(t_train, 1), "total_wall_s": round(time.perf_counter() - t0, 1),
              "before": before, "after": after, "output_dir": str(out)}
    write_text_atomic(out / "demo.json", json.dumps(result, indent=2, ensure_ascii=False))
    _print_table(before, after)
    print(f"\nToken explorer (hover a token: PIR, log-probs, weight, top candidates):\n"
          f"  {out / 'heatmap_before.html'}\n  {out / 'heatmap_after.html'}\nTraining report: {report}")
    return {"output_dir": str(out), "train_steps": result["train_steps"], "total_wall_s": result["total_wall_s"]}


def _print_table(before: dict, after: dict) -> None:
    rows = [("NLL/token with profile", "nll_with_profile"), ("NLL/token without profile", "nll_without_profile"),
            ("mean PIR (nats)", "mean_pir"), ("share of tokens with PIR > 0.8", "share_pir_above_min"),
            ("ROUGE-L of greedy generations", "rougeL")]
    print(f"\n{'held-out messages (12)':34s} {'before':>9s} {'after':>9s}")
    for label, key in rows:
        if before.get(key) is None:
            continue
        print(f"{label:34s} {before[key]:9.4f} {after[key]:9.4f}")
    ex = after.get("example_generation")
    if ex:
        print(f"\nexample {ex['id']} after:\n  generated: {ex['prediction'][:200]}\n  gold:      {ex['gold']}")
