"""``percontrast generate``: personalized generation for a data file, written as predictions.

    percontrast generate --model runs/perce --data test.jsonl --task email --output-dir out/gen
    percontrast generate --model runs/perce --data test.jsonl --task email --contrast-alpha 1 \\
                         --explain out/gen/explain.html

Writes ``predictions.json`` in the LaMP/LongLaMP exchange format
(``{"task": ..., "golds": [{"id", "output"}]}``) and ``predictions.jsonl`` (one row per
example with its prompt input, ``new_tokens`` and ``ended``: whether it stopped at an end
token before ``--max-new-tokens``).

``--explain FILE.html`` (with ``--contrast-alpha``, greedy) also writes the token explorer of
the generated outputs: each token coloured by its PIR at decode time (log p(token | profile,
...) - log p(token | the counterfactual prompt, ...), from the logits the contrast loop computes
anyway), and every token the contrast changed marked, with the token plain greedy decoding
(alpha 0) would have picked after the same prefix on hover. See docs/explorer.md.
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
    overwrite: bool = field(False, help="Replace existing predictions (and the --explain page).")
    explain: str = field("", help="Also write this HTML page (the token explorer) of the generated outputs: "
                         "each token coloured by its PIR at decode time, and each token the contrast changed "
                         "marked, with the token plain greedy decoding (--contrast-alpha 0) would have picked "
                         "after the same prefix on hover. Needs --contrast-alpha > 0 and greedy decoding.")

    def __post_init__(self):
        super().__post_init__()
        self.refuse_unused_contrast_options()
        if self.explain:
            if not self.contrastive:
                raise UserError("--explain shows which tokens --contrast-alpha changed; give --contrast-alpha > 0 "
                                "(for the PIR of a plain generation, run 'percontrast score' on its predictions)")
            if self.do_sample:
                raise UserError("--explain compares each token with the plain greedy pick; it needs greedy "
                                "decoding (drop --do-sample)")


def explain_examples(tok, records: list[dict], texts: list[str], info: list[dict]) -> list[dict]:
    """The token explorer's examples (``heatmap.render``) from ``generate_for(..., info=..., explain=True)``:
    per generated token its string, PIR = logp_with - logp_without at decode time, both log-probs, the
    entropy, the top candidates, the plain greedy pick and whether the contrast changed the token."""
    decoded: dict[int, str] = {}

    def d(t: int) -> str:
        if t not in decoded:
            decoded[t] = tok.decode([t])
        return decoded[t]

    out = []
    for r, text, inf in zip(records, texts, info):
        ids, plain = inf["token_ids"], inf["plain_ids"]
        out.append({
            "id": r["id"], "input": r["input"], "output": text, "tokens": [d(t) for t in ids], "token_ids": ids,
            "pir": [a - b for a, b in zip(inf["logp_with"], inf["logp_without"])],
            "logp_with": inf["logp_with"], "logp_without": inf["logp_without"], "entropy": inf["entropy"],
            "top_with": [[[d(t), p] for t, p in c] for c in inf["top_with"]],
            "top_without": [[[d(t), p] for t, p in c] for c in inf["top_without"]],
            "plain_tokens": [d(t) for t in plain], "changed": [a != b for a, b in zip(ids, plain)],
            "profile": inf["profile"], "profile_removed": inf["profile_removed"]})
    return out


def run(cfg: GenerateConfig) -> dict:
    from ..data import write_predictions
    from ..datasets import load_records
    from ..files import refuse_to_replace, write_text_atomic
    from ..generation import generate_for, hit_max_share
    from ..prompts import get_task

    out = Path(cfg.output_dir)
    refuse_to_replace(out / "predictions.json", cfg.overwrite)
    if cfg.explain:
        if Path(cfg.explain).is_dir():
            raise UserError(f"--explain {cfg.explain} is a folder; give the HTML file to write")
        refuse_to_replace(Path(cfg.explain), cfg.overwrite)
    records = load_records(cfg.data, get_task(cfg.task), require_output=False, limit=cfg.limit)
    model, tok = cfg.load_model(device="default")
    info: list[dict] = []
    texts = generate_for(model, tok, records, cfg.task, cfg, cfg, use_profile=not cfg.no_profile, seed=cfg.seed,
                         info=info, explain=bool(cfg.explain))
    write_predictions(out, cfg.task, records, texts,
                      [{"id": r["id"], "input": r["input"], "prediction": t, "new_tokens": i["new_tokens"],
                        "ended": i["ended"]} for r, t, i in zip(records, texts, info)])
    result = {"examples": len(records), "output_dir": str(out),
              "hit_max_new_tokens": hit_max_share(info)}
    if cfg.explain:
        from ..heatmap import render
        examples = explain_examples(tok, records, texts, info)
        contrast = {"alpha": cfg.contrast_alpha, "plausibility": cfg.contrast_plausibility,
                    "counterfactual": cfg.contrast_counterfactual}
        write_text_atomic(Path(cfg.explain), render(
            examples, title=f"Contrastive decoding explained: {cfg.model}", contrast=contrast,
            counterfactual=cfg.contrast_counterfactual))
        result["explain"] = cfg.explain
        result["changed_tokens"] = sum(sum(e["changed"]) for e in examples)
    return result
