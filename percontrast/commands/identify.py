"""Personal-token identification: score token classifiers against labelled spans.

Records carry ``spans`` (see ``datasets/synthetic.py``). A response token is personal when its
character span overlaps a labelled span (offsets of the response tokenized on its own,
exactly as ``PromptBuilder.response_ids`` does; the appended EOS is not scored); its
kind is the span's kind. Signals, each "higher = more personal":

* ``pir_remove``: PIR with the profile removed, log p(y|p_u,x) - log p(y|x) (PerContrast).
* ``pir_swap``: log p(y|p_u,x) - log p(y|p_v,x), another user's profile swapped in
  (separates "this user's context" from "any context").
* ``word_match``: 1 if the token's word (lower-cased, punctuation stripped) occurs in the
  profile items the model sees (the top-k retrieved ones), else 0 (the paper's baseline).
* ``loss``: -log p(y|p_u,x) (the LossCE signal); ``entropy``: predictive entropy (EntCE).
* ``random``: seeded uniform noise.

Metrics per signal (``percontrast.stats``): AUROC, best F1 over thresholds, and F1 at the
threshold that was best on the validation split (``val``; "dev" in the metric names and
``--dev-limit``), applied to test; overall (personal vs generic) and per kind (that kind vs
generic). The other user's profile is ``retrieval.other_user_profiles`` over the whole split.
Bootstrap 95% intervals resample test records. The same metrics are also computed per
whitespace word (max of the word's token scores), since PIR tends to mark only the first
piece of a multi-token word. Per-token scores go to ``scores.jsonl`` for further analysis.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import field
from ..datasets.synthetic import KINDS, norm_word
from ..errors import DataError, UserError
from ..options import ModelOptions, PromptOptions
from ..stats import auroc, best_f1, f1_at

logger = logging.getLogger(__name__)

SIGNALS = {
    "pir_remove": "PIR, profile removed: log p(y|p_u,x) - log p(y|x)",
    "pir_swap": "PIR, other user's profile: log p(y|p_u,x) - log p(y|p_v,x)",
    "word_match": "token's word occurs in the retrieved profile items (binary)",
    "loss": "per-token loss -log p(y|p_u,x) (LossCE signal)",
    "entropy": "predictive entropy with the profile, nats (EntCE signal)",
    "random": "seeded uniform noise",
}
GROUPS = ("overall",) + KINDS


@dataclass
class IdentifyConfig(ModelOptions, PromptOptions):
    # The synthetic benchmark is written as email: the one option whose default differs here.
    task: str = field("email", help="Prompt template (the synthetic benchmark uses email).")
    data: str = field("synthetic", help="A folder with val.jsonl (older prepared folders: dev.jsonl) and "
                      "test.jsonl whose records carry 'spans', or 'synthetic' to generate the benchmark in memory "
                      "with --seed.")
    batch_size: int = field(8, help="Records per forward batch.")
    n_personas: int = field(200, help="Personas when --data synthetic (60/20/20 split by persona).")
    limit: int | None = field(None, help="Use only the first N test records.")
    dev_limit: int | None = field(None, help="Use only the first N dev records (default: --limit).")
    bootstrap: int = field(200, help="Bootstrap resamples of test records for 95 percent intervals (0: none).")
    output_dir: str = field("runs/identify", help="Where identify.json and identify.md go.")

    def __post_init__(self):
        super().__post_init__()   # model and prompt options (task, k >= 0, max_length)
        for name in ("batch_size", "n_personas"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k < 1:
            raise UserError(f"k must be >= 1 (no profile, nothing to identify), got {self.k}")
        for name in ("limit", "dev_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} must be >= 1, got {v}")
        if self.bootstrap < 0:
            raise UserError(f"bootstrap must be >= 0, got {self.bootstrap}")


# ----------------------------------------------------------------------------- labels
def response_offsets(tokenizer, output: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of the response tokenized on its own (as ``PromptBuilder.response_ids``)."""
    enc = tokenizer(output, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def token_kinds(offsets: list[tuple[int, int]], spans: list[dict]) -> list[str | None]:
    """Kind of the labelled span each token overlaps most (first span on ties), or None (generic)."""
    out = []
    for s, e in offsets:
        best, best_ov = None, 0
        for sp in spans:
            ov = min(e, sp["end"]) - max(s, sp["start"])
            if ov > best_ov:
                best, best_ov = sp["kind"], ov
        out.append(best)
    return out


def token_words(output: str, offsets: list[tuple[int, int]]) -> tuple[np.ndarray, list[str]]:
    """Per token, the index of its word (the whitespace word holding its first non-space char, -1 for a
    whitespace-only token), and each word's matching key (``norm_word``)."""
    word_at = np.full(len(output) + 1, -1)
    keys = []
    for i, m in enumerate(re.finditer(r"\S+", output)):
        word_at[m.start():m.end()] = i
        keys.append(norm_word(m.group()))
    idx = np.array([next((int(word_at[c]) for c in range(s, e) if word_at[c] >= 0), -1) for s, e in offsets],
                   dtype=np.int64)
    return idx, keys


def word_match(output: str, offsets: list[tuple[int, int]], profile_words: set[str]) -> np.ndarray:
    """1.0 where the token's word (lower-cased, punctuation stripped) occurs in ``profile_words``."""
    idx, keys = token_words(output, offsets)
    return np.array([float(i >= 0 and keys[i] != "" and keys[i] in profile_words) for i in idx])


def profile_word_set(task, items: list[dict]) -> set[str]:
    from ..retrieval import item_text
    return {norm_word(w) for it in items for w in item_text(task, it).split()} - {""}


def check_spans(records: list[dict], source: str) -> None:
    for r in records:
        spans = r.get("spans")
        if not isinstance(spans, list):
            raise DataError("missing (identify needs labelled spans)", file=source, record=r["id"], field="spans")
        for i, sp in enumerate(spans):
            ok = (isinstance(sp, dict) and isinstance(sp.get("start"), int) and isinstance(sp.get("end"), int)
                  and 0 <= sp["start"] < sp["end"] <= len(r["output"]))
            if not ok:
                raise DataError("expected {start, end} with 0 <= start < end <= len(output)", file=source,
                                record=r["id"], field=f"spans[{i}]")
            if sp.get("kind") not in KINDS:
                raise DataError(f"kind {sp.get('kind')!r} is not one of {', '.join(KINDS)}", file=source,
                                record=r["id"], field=f"spans[{i}].kind")


# ----------------------------------------------------------------------------- scoring
def score_split(model, tokenizer, builder, records: list[dict], batch_size: int, seed: int,
                device: str = "cpu", pool: list[dict] | None = None) -> list[dict]:
    """Per record: ``kinds`` (token labels) and one array per signal, over the response tokens (no EOS).

    The other user's profile comes from ``pool`` (default ``records``): the whole split, so that
    a ``limit`` does not shrink the choice of other users.
    """
    from ..encoding import PairedCollator
    from ..retrieval import other_user_profiles
    from ..scoring import counterfactual_logp, score_batch

    collate = PairedCollator(tokenizer.pad_token_id)
    pool = pool if pool is not None else records
    others = dict(zip((r["id"] for r in pool), other_user_profiles(pool, seed)))
    out = []
    for b0 in range(0, len(records), batch_size):
        chunk = records[b0:b0 + batch_size]
        feats = [builder.encode(r) for r in chunk]
        swaps = [builder.encode(r, profile=others[r["id"]]) for r in chunk]
        for f, s in zip(feats, swaps):
            if f["response"] != s["response"]:  # only possible when max_length cut a response
                raise UserError(f"record {f['id']}: the response was cut differently with the other user's "
                                f"profile; raise max_length")
        batch = {k: v.to(device) for k, v in collate(feats).items()}
        sc = score_batch(model, batch)
        # The swap pass: the collator's counterfactual slot carries the other user's prompt.
        sw = collate([{"prompt_with": f["prompt_with"], "prompt_without": s["prompt_with"],
                       "response": f["response"]} for f, s in zip(feats, swaps)])
        logp_other = counterfactual_logp(model, {k: v.to(device) for k, v in sw.items()})
        items_seen = [builder.profile_items(r) for r in chunk]
        for i, (r, f) in enumerate(zip(chunk, feats)):
            ids, offsets = response_offsets(tokenizer, r["output"])
            n = min(len(ids), len(f["response"]))
            if f["response"][:n] != ids[:n]:
                raise RuntimeError(f"record {r['id']}: response ids differ from PromptBuilder.response_ids")
            lw = sc.logp_with[i, :n].double().cpu().numpy()
            out.append({
                "id": r["id"], "kinds": token_kinds(offsets[:n], r["spans"]),
                "words": token_words(r["output"], offsets[:n])[0],
                "pir_remove": lw - sc.logp_without[i, :n].double().cpu().numpy(),
                "pir_swap": lw - logp_other[i, :n].double().cpu().numpy(),
                "word_match": word_match(r["output"], offsets[:n], profile_word_set(builder.task, items_seen[i])),
                "loss": -lw, "entropy": sc.entropy[i, :n].double().cpu().numpy(),
            })
        logger.info("scored %d/%d", min(b0 + batch_size, len(records)), len(records))
    rng = np.random.default_rng(seed)
    for rec in out:
        rec["random"] = rng.random(len(rec["kinds"]))
    return out


def to_words(scored: list[dict]) -> list[dict]:
    """Word-level view: a word is personal if any of its tokens is (the first personal token's kind);
    each signal is the max over the word's tokens. Whitespace-only tokens are dropped."""
    out = []
    for r in scored:
        words = sorted({int(w) for w in r["words"] if w >= 0})
        rec = {"id": r["id"], "kinds": [], "words": np.arange(len(words))}
        members = [np.flatnonzero(r["words"] == w) for w in words]
        for m in members:
            rec["kinds"].append(next((r["kinds"][j] for j in m if r["kinds"][j] is not None), None))
        for sig in SIGNALS:
            rec[sig] = np.array([r[sig][m].max() for m in members])
        out.append(rec)
    return out


def _stack(scored: list[dict], group: str, signal: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 0/1 labels of one group: personal (or one kind) against generic tokens."""
    s = np.concatenate([r[signal] for r in scored]) if scored else np.zeros(0)
    kinds = [k for r in scored for k in r["kinds"]]
    keep = np.array([k is None or group == "overall" or k == group for k in kinds], dtype=bool)
    y = np.array([k is not None for k in kinds], dtype=bool)
    return s[keep], y[keep]


def evaluate(dev: list[dict], test: list[dict], bootstrap: int = 0, seed: int = 0) -> dict:
    """metrics[signal][group] = auroc, best_f1, best_f1_threshold, dev_threshold, f1_at_dev, (+ CIs), mean."""
    rng = np.random.default_rng(seed + 1)
    boots = [rng.integers(0, len(test), len(test)) for _ in range(bootstrap)]
    metrics: dict = {}
    for sig in SIGNALS:
        metrics[sig] = {}
        for g in GROUPS:
            s, y = _stack(test, g, sig)
            ds, dy = _stack(dev, g, sig)
            _, t_dev = best_f1(ds, dy)
            f1, t = best_f1(s, y)
            m = {"auroc": auroc(s, y), "best_f1": f1, "best_f1_threshold": t, "dev_threshold": t_dev,
                 "f1_at_dev": f1_at(s, y, t_dev), "n_pos": int(y.sum()), "n_neg": int((~y).sum()),
                 "mean_pos": float(s[y].mean()) if y.any() else float("nan"),
                 "mean_neg": float(s[~y].mean()) if (~y).any() else float("nan")}
            if boots:
                a, f = [], []
                for idx in boots:
                    bs, by = _stack([test[i] for i in idx], g, sig)
                    a.append(auroc(bs, by))
                    f.append(f1_at(bs, by, t_dev))
                m["auroc_ci"] = [float(np.nanpercentile(a, 2.5)), float(np.nanpercentile(a, 97.5))]
                m["f1_at_dev_ci"] = [float(np.nanpercentile(f, 2.5)), float(np.nanpercentile(f, 97.5))]
            metrics[sig][g] = m
    return metrics


def counts(scored: list[dict]) -> dict:
    kinds = [k for r in scored for k in r["kinds"]]
    return {"records": len(scored), "tokens": len(kinds), "generic": sum(k is None for k in kinds),
            **{k: kinds.count(k) for k in KINDS}}


# ----------------------------------------------------------------------------- report
def _fmt(x: float, ci: list | None = None) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and all(np.isfinite(ci)) else "")


def markdown(result: dict) -> str:
    c = result["counts"]
    lines = [f"# Personal-token identification: {result['config']['model']}", "",
             f"Data: {result['config']['data']} ({result['run'].get('date', '')}, {result['run'].get('machine', '')}). "
             f"Thresholds for F1@dev are chosen on dev, applied to test. "
             + ("Brackets: bootstrap 95% interval over test records." if result["config"]["bootstrap"] else ""),
             "", "| split | records | tokens | generic | copied | implied | style |", "|---|---|---|---|---|---|---|"]
    for split in ("dev", "test"):
        lines.append(f"| {split} | " + " | ".join(str(c[split][k]) for k in
                                                  ("records", "tokens", "generic", *KINDS)) + " |")
    for g in GROUPS:
        what = "all personal tokens" if g == "overall" else f"{g} tokens"
        lines += ["", f"## {g} ({what} vs generic tokens; test)", "",
                  "| signal | AUROC | best F1 | F1@dev-threshold | mean (pos / generic) |", "|---|---|---|---|---|"]
        for sig in SIGNALS:
            m = result["metrics"][sig][g]
            lines.append(f"| {sig} | {_fmt(m['auroc'], m.get('auroc_ci'))} | {_fmt(m['best_f1'])} | "
                         f"{_fmt(m['f1_at_dev'], m.get('f1_at_dev_ci'))} | "
                         f"{_fmt(m['mean_pos'])} / {_fmt(m['mean_neg'])} |")
    wc = result["word_counts"]["test"]
    lines += ["", f"## Word level (test; {wc['tokens']} words: a word is personal if any of its tokens is, "
              "its score is the max over its tokens)", "",
              "| signal | " + " | ".join(f"{g} AUROC | {g} F1@dev" for g in GROUPS) + " |",
              "|---|" + "---|---|" * len(GROUPS)]
    for sig in SIGNALS:
        ms = result["word_metrics"][sig]
        lines.append(f"| {sig} | " + " | ".join(f"{_fmt(ms[g]['auroc'])} | {_fmt(ms[g]['f1_at_dev'])}"
                                                for g in GROUPS) + " |")
    lines += ["", "Signals:", ""] + [f"- `{k}`: {v}" for k, v in SIGNALS.items()]
    return "\n".join(lines) + "\n"


def _load_split(folder: Path, names: tuple[str, ...], task) -> list[dict]:
    from ..datasets import load_records
    for n in names:
        p = folder / n
        if p.exists():
            recs = load_records(str(p), task)
            check_spans(recs, str(p))
            return recs
    raise DataError(f"no {' or '.join(names)} in this folder", file=str(folder))


def load_data(cfg: IdentifyConfig) -> tuple[list[dict], list[dict]]:
    """The full threshold-picking split (``val``; called dev in the metrics and ``--dev-limit``) and the
    test split (``run`` applies the limits)."""
    from ..prompts import get_task
    if cfg.data == "synthetic":
        from ..datasets.synthetic import generate
        splits = generate(seed=cfg.seed, n_personas=cfg.n_personas)
        return splits["val"], splits["test"]
    folder = Path(cfg.data)
    if not folder.is_dir():
        raise UserError(f"data: {folder} is not a folder (give a folder with val.jsonl and test.jsonl, "
                        f"or 'synthetic')")
    task = get_task(cfg.task)
    # val.jsonl is the split name every preparer writes. Folders prepared before the synthetic
    # benchmark switched from train/dev/test to train/val/test hold dev.jsonl instead: still read it,
    # when there is no val.jsonl, so that existing prepared folders keep working.
    return _load_split(folder, ("val.jsonl", "dev.jsonl"), task), _load_split(folder, ("test.jsonl",), task)


def run(cfg: IdentifyConfig) -> dict:
    """Score dev and test, compute the metrics, write ``identify.json`` and ``identify.md``."""
    import torch

    from ..files import write_text_atomic
    from ..models import default_device
    from ..runinfo import run_info

    t0 = time.perf_counter()
    dev, test = load_data(cfg)
    model, tok = cfg.load_model()
    device = default_device()
    model.to(device).eval()
    builder = cfg.prompt_builder(tok)
    dev_limit = cfg.dev_limit if cfg.dev_limit is not None else cfg.limit
    with torch.no_grad():
        scored = {name: score_split(model, tok, builder, recs[:lim], cfg.batch_size, cfg.seed, device, pool=recs)
                  for name, recs, lim in (("dev", dev, dev_limit), ("test", test, cfg.limit))}
    t_score = time.perf_counter() - t0
    metrics = evaluate(scored["dev"], scored["test"], bootstrap=cfg.bootstrap, seed=cfg.seed)
    words = {s: to_words(v) for s, v in scored.items()}
    word_metrics = evaluate(words["dev"], words["test"], bootstrap=cfg.bootstrap, seed=cfg.seed)
    result = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
              "run": run_info(), "counts": {s: counts(v) for s, v in scored.items()},
              "word_counts": {s: counts(v) for s, v in words.items()},
              "response_cut": builder.stats.response_cut, "signals": SIGNALS, "metrics": metrics,
              "word_metrics": word_metrics,
              "seconds": {"scoring": round(t_score, 1), "total": round(time.perf_counter() - t0, 1)}}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "identify.json", json.dumps(_nan_to_none(result), indent=2, allow_nan=False) + "\n")
    write_text_atomic(out / "identify.md", markdown(result))
    write_text_atomic(out / "scores.jsonl", "".join(
        json.dumps({"split": split, "id": r["id"], "kinds": r["kinds"], "words": r["words"].tolist(),
                    **{sig: np.round(r[sig], 5).tolist() for sig in SIGNALS}}) + "\n"
        for split, recs in scored.items() for r in recs))
    return result


def _nan_to_none(x):
    """Strict JSON: NaN (a metric with no positives) becomes null."""
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
