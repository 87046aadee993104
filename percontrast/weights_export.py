"""Per-token PerCE weights as data other trainers read (``percontrast export-weights``).

The weights are computed elsewhere (``commands/score.score_records``: ``scoring.score_batch`` then
``losses.clip_weights``, the code ``percontrast score`` runs); this module only lays them out:

* ``example_columns``: one training row aligned to the tokenizer's ids, as ``PerCETrainer`` sees the
  example (with-profile prompt ids, then the response ids tokenized on their own, see
  ``encoding.PromptBuilder``): ``input_ids``, ``attention_mask``, ``labels`` (-100 on the prompt),
  ``completion_mask``, ``weights`` (0 on the prompt, clip(PIR, m, M) on the completion) and ``pir``
  (the raw PIR of the completion tokens only).
* ``weight_segments`` / ``swift_row``: ms-swift's per-message ``loss_scale`` (ms-swift >= 4.2.0),
  which weights whole text segments, not tokens: runs of equal weight become consecutive assistant
  messages. ms-swift tokenizes each segment on its own, so a cut is kept only where that
  re-tokenization gives back exactly our ids; elsewhere neighbouring runs are merged and get their
  mean weight (counted in ``SegmentStats``).
* ``collate_weighted`` / ``weighted_loss_from_logits``: the consumer side, sum(w * nll) / n over the
  exported columns, through ``losses.weighted_nll`` (the trainer's own rule).
* ``export_metadata`` / ``read_example``: reading an export back (its ``export_info.json`` from the
  dataset's info, one row split into prompt, completion and completion weights), for
  ``trl_sft.PerCESFTTrainer``, which trains on the exported dataset directly.

Offline weights are this project's ``refresh=once`` signal with a fixed model, not the paper's
bootstrap (which re-estimates PIR with the model being trained at every step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .losses import Normalize, weighted_nll
from .pir import token_logprobs

IGNORE_INDEX = -100   # labels outside the loss, as transformers and TRL read them


def example_columns(prompt_ids: list[int], completion_ids: list[int], pir: list[float],
                    weights: list[float]) -> dict[str, list]:
    """The aligned columns of one example (``pir`` and ``weights`` are per completion token)."""
    if not len(completion_ids) == len(pir) == len(weights):
        raise ValueError(f"{len(completion_ids)} completion ids but {len(pir)} PIR values, {len(weights)} weights")
    P, R = len(prompt_ids), len(completion_ids)
    return {"input_ids": list(prompt_ids) + list(completion_ids),
            "attention_mask": [1] * (P + R),
            "labels": [IGNORE_INDEX] * P + list(completion_ids),
            "completion_mask": [0] * P + [1] * R,
            "weights": [0.0] * P + list(weights),
            "pir": list(pir)}


def features(float_dtype: str):
    """Arrow types of the export. ``float_dtype`` is the dtype PIR was computed in (float32, or float64
    for a float64 model), so the stored weights are the computed values, not a rounding of them."""
    from datasets import Features, List, Value
    return Features({
        "id": Value("string"), "user_id": Value("string"),
        "input_ids": List(Value("int32")), "attention_mask": List(Value("int8")),
        "labels": List(Value("int32")), "completion_mask": List(Value("int8")),
        "weights": List(Value(float_dtype)), "pir": List(Value(float_dtype))})


# ----------------------------------------------------------------------------- ms-swift segments
@dataclass
class Segment:
    text: str
    start: int          # token span [start, end) within the completion's text tokens
    end: int
    loss_scale: float   # the tokens' weight; their mean where runs had to be merged


@dataclass
class SegmentStats:
    """What the span mapping changed, summed over examples."""
    segments: int = 0
    runs: int = 0                      # runs of equal weight before any merge
    merged_tokens: int = 0             # tokens whose segment weight is a mean of different weights
    max_weight_change: float = 0.0     # largest |segment weight - token weight| over those tokens
    not_round_trip: list[str] = field(default_factory=list)   # ids whose whole text re-tokenizes differently

    def add(self, segs: list[Segment], runs: int, weights: list[float]) -> None:
        self.segments += len(segs)
        self.runs += runs
        for s in segs:
            span = weights[s.start:s.end]
            if any(w != span[0] for w in span):
                self.merged_tokens += len(span)
                self.max_weight_change = max(self.max_weight_change, *(abs(w - s.loss_scale) for w in span))

    def as_dict(self) -> dict:
        return {"segments": self.segments, "runs_of_equal_weight": self.runs, "merged_tokens": self.merged_tokens,
                "max_weight_change": self.max_weight_change, "texts_not_round_trip": self.not_round_trip}


def _decode(tokenizer, ids: list[int]) -> str:
    # no clean-up of spaces: the text must be the tokens' own bytes, so that it re-tokenizes to them
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _encode(tokenizer, text: str) -> list[int]:
    # what ms-swift's Template._tokenize does with a response segment
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def weight_segments(tokenizer, ids: list[int], weights: list[float]) -> tuple[list[Segment], int, bool]:
    """Split a completion's text tokens into text segments that ms-swift tokenizes back to exactly
    ``ids``, one weight each: (segments, number of runs of equal weight before merging, whether the
    segments do round-trip; False only when even the whole text re-tokenizes differently).

    Start from the runs of equal weight (each is exact). A run whose decoded text does not
    re-tokenize to its own ids (a cut inside a multi-byte character, a merge the tokenizer makes
    across the cut) is merged with its right neighbour (the left one at the end) and the merged
    segment gets the mean weight of its tokens: the total weight of the segment is kept, the split
    between its tokens is lost. Neighbours of equal weight are merged too, since ms-swift joins
    equal-scale neighbours into one string before tokenizing, and the joined text must round-trip.
    """
    n = len(ids)
    if n == 0:
        return [], 0, True
    if len(weights) != n:
        raise ValueError(f"{n} ids but {len(weights)} weights")
    cuts = [0] + [i for i in range(1, n) if weights[i] != weights[i - 1]] + [n]
    spans = [[a, b] for a, b in zip(cuts, cuts[1:])]
    runs = len(spans)

    def scale(s):   # mean in float64 (Python floats); a single run is its weight exactly
        span = weights[s[0]:s[1]]
        return span[0] if all(w == span[0] for w in span) else sum(span) / len(span)

    i, round_trip = 0, True
    while i < len(spans):
        s = spans[i]
        ok = _encode(tokenizer, _decode(tokenizer, ids[s[0]:s[1]])) == ids[s[0]:s[1]]
        same_as_next = ok and i + 1 < len(spans) and scale(spans[i + 1]) == scale(s)
        if ok and not same_as_next:
            i += 1
            continue
        if len(spans) == 1:   # the whole text does not round-trip: nothing left to merge with
            round_trip = False
            break
        if i + 1 < len(spans):
            spans[i][1] = spans[i + 1][1]
            del spans[i + 1]
        else:
            spans[i - 1][1] = s[1]
            del spans[i]
            i -= 1
        i = max(i - 1, 0)   # the merged span's new weight may now equal its left neighbour's
    return [Segment(_decode(tokenizer, ids[a:b]), a, b, scale([a, b])) for a, b in spans], runs, round_trip


def swift_row(prompt_text: str, segments: list[Segment], system: str | None = None) -> dict:
    """One line of an ms-swift SFT dataset: the with-profile prompt as the user turn, then one
    assistant message per segment with its ``loss_scale`` (consecutive assistant messages are merged
    by ms-swift's swift template backend into one response, keeping each part's scale)."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": prompt_text})
    msgs += [{"role": "assistant", "content": s.text, "loss_scale": float(s.loss_scale)} for s in segments]
    return {"messages": msgs}


# ----------------------------------------------------------------------------- assembling, writing
COLUMNS = ("id", "user_id", "input_ids", "attention_mask", "labels", "completion_mask", "weights", "pir")


@dataclass
class Export:
    columns: dict[str, list]
    swift_rows: list[dict]
    stats: SegmentStats


def build_export(records: list[dict], scored: list[dict], builder, tokenizer, *, swift: bool) -> Export:
    """Rows of every format from the records and their ``score_records`` results (same order)."""
    import dataclasses

    from .encoding import EncodeStats
    # its own counts: the caller's builder already counted these records' cuts while scoring
    builder = dataclasses.replace(builder, stats=EncodeStats())
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    rows, stats = [], SegmentStats()
    for record, s in zip(records, scored, strict=True):
        enc = builder.encode(record)
        if enc["response"] != s["token_ids"] or str(record["id"]) != s["id"]:
            raise RuntimeError(f"record {record['id']}: encoding differs from the scored one")
        for k, v in example_columns(enc["prompt_with"], enc["response"], s["pir"], s["weights"]).items():
            cols[k].append(v)
        cols["id"].append(str(record["id"]))
        cols["user_id"].append(None if record.get("user_id") is None else str(record["user_id"]))
        if swift:
            n = len(text_ids(builder, tokenizer, record, enc["response"]))
            segs, runs, exact = weight_segments(tokenizer, enc["response"][:n], s["weights"][:n])
            stats.add(segs, runs, s["weights"][:n])
            if not exact:
                stats.not_round_trip.append(str(record["id"]))
            rows.append(swift_row(enc["prompt_with_text"], segs, builder.system_prompt))
    return Export(cols, rows, stats)


def text_ids(builder, tokenizer, record: dict, response: list[int]) -> list[int]:
    """The completion ids without the end-of-turn id that ``PromptBuilder.response_ids`` appends
    (a text format carries text; the framework's template adds its own end-of-turn token). A
    response cut by max_length has lost its end id, and is all text."""
    full = builder.response_ids(record["output"])
    if builder.end_id is not None and response == full:
        return response[:-1]
    return response


def write_export(folder, export: Export, formats: list[str], info: dict, float_dtype: str) -> dict[str, str]:
    """Write the chosen formats and ``export_info.json`` into ``folder`` (the caller's temp folder,
    published atomically); returns {format: relative path}."""
    import datasets
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()   # a few rows' "Saving the dataset" bars say nothing the summary does not
    try:
        return _write(folder, export, formats, info, float_dtype)
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _write(folder, export: Export, formats: list[str], info: dict, float_dtype: str) -> dict[str, str]:
    import json
    from pathlib import Path

    from datasets import Dataset, DatasetInfo

    folder = Path(folder)
    files = {"hf": "dataset", "parquet": "weights.parquet", "jsonl": "weights.jsonl", "swift": "swift.jsonl"}
    files = {f: files[f] for f in formats}
    info = {**info, "files": {**files, "info": "export_info.json"}}
    feats = features(float_dtype)
    ds = Dataset.from_dict(export.columns, features=feats, info=DatasetInfo(
        description=json.dumps(info, ensure_ascii=False, default=str), features=feats))
    if "hf" in files:
        ds.save_to_disk(str(folder / files["hf"]))
    if "parquet" in files:
        ds.to_parquet(str(folder / files["parquet"]))
    if "jsonl" in files:
        # one JSON object per example; floats are written with repr, so they read back exactly
        (folder / files["jsonl"]).write_text("".join(json.dumps({c: export.columns[c][i] for c in COLUMNS},
                                                                ensure_ascii=False) + "\n"
                                                     for i in range(len(ds))), encoding="utf-8")
    if "swift" in files:
        (folder / files["swift"]).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                     for r in export.swift_rows), encoding="utf-8")
    (folder / "export_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=1, default=str) + "\n",
                                             encoding="utf-8")
    return files


# ----------------------------------------------------------------------------- consumer side
def collate_weighted(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad exported rows into a batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 on
    padding) and ``weights`` (0 on padding), each [B, L]."""
    L = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    lab = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    # float64 holds every float32 and float64 weight exactly; weighted_nll casts to the log-probs' dtype
    w = torch.zeros((B, L), dtype=torch.float64)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        att[b, :n] = torch.as_tensor(r["attention_mask"], dtype=torch.long)
        lab[b, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
        w[b, :n] = torch.as_tensor(r["weights"], dtype=torch.float64)
    return {"input_ids": ids, "attention_mask": att, "labels": lab, "weights": w}


def weighted_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                              normalize: Normalize = "tokens", num_items: int | None = None) -> torch.Tensor:
    """PerCE over exported columns: position t predicts token t+1, so logits [B, L, V] are shifted
    against ``labels`` / ``weights`` [B, L]; then ``losses.weighted_nll`` (sum(w * -logp) / n, n the
    tokens with a label, or ``num_items`` for the whole optimizer step)."""
    targets, w = labels[:, 1:], weights[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = token_logprobs(logits[:, :-1], targets.clamp(min=0))   # [B, L-1]; -100 gathers index 0, masked
    return weighted_nll(logp, w.to(logp.dtype), mask, normalize, num_items)


# ----------------------------------------------------------------------------- reading an export back
def export_metadata(dataset) -> dict | None:
    """The ``export_info.json`` an export wrote into its datasets folder's ``info.description``, or None
    when the dataset does not carry it (made by hand, or read from parquet / jsonl, which drop it)."""
    import json
    try:
        info = json.loads(getattr(getattr(dataset, "info", None), "description", None) or "")
    except ValueError:
        return None
    return info if isinstance(info, dict) and str(info.get("format", "")).startswith("percontrast-weights/") else None


def read_example(row: dict) -> tuple[list[int], list[int], list[float]]:
    """The inverse of ``example_columns``: (prompt ids, completion ids, completion weights) of one row
    with ``input_ids``, ``weights`` and ``completion_mask`` and / or ``labels`` (-100 off the loss).
    Raises ``ValueError`` (one line, no location: the caller knows the row) for a row whose columns do
    not describe one prompt followed by one completion, since a trainer that pairs each completion
    token with its weight would otherwise train on misaligned weights."""
    import math
    ids, w = list(row["input_ids"]), list(row["weights"])
    L = len(ids)
    if len(w) != L:
        raise ValueError(f"'weights' has {len(w)} values for {L} input_ids; they must be aligned token by token")
    for c in ("attention_mask", "completion_mask", "labels"):
        if row.get(c) is not None and len(row[c]) != L:
            raise ValueError(f"'{c}' has {len(row[c])} values for {L} input_ids")
    if row.get("attention_mask") is not None and not all(a == 1 for a in row["attention_mask"]):
        raise ValueError("'attention_mask' has zeros: rows must be stored unpadded (the collator pads)")
    from_labels = None if row.get("labels") is None else [lab != IGNORE_INDEX for lab in row["labels"]]
    if row.get("completion_mask") is not None:
        mask = [bool(m) for m in row["completion_mask"]]
        if from_labels is not None and from_labels != mask:
            raise ValueError("'labels' and 'completion_mask' disagree on which tokens are the completion")
    elif from_labels is not None:
        mask = from_labels
    else:
        raise ValueError("needs 'completion_mask' or 'labels' to tell the completion from the prompt")
    P = mask.index(True) if True in mask else L
    if P == L:
        raise ValueError("has no completion tokens (completion_mask all 0 / labels all -100)")
    if P == 0:
        raise ValueError("the completion starts at the first token, which no position predicts; keep a prompt")
    if not all(mask[P:]):
        raise ValueError("the completion must be one run of tokens at the end of input_ids (prompt, then completion)")
    if row.get("labels") is not None and list(row["labels"][P:]) != ids[P:]:
        raise ValueError("'labels' differ from input_ids on the completion (they must be the same ids, unshifted)")
    if any(v != 0 for v in w[:P]):
        raise ValueError("'weights' is non-zero on the prompt, where nothing is trained; set it to 0 there")
    if not all(math.isfinite(v) for v in w[P:]):
        raise ValueError("'weights' holds a non-finite value on the completion")
    return ids[:P], ids[P:], w[P:]
