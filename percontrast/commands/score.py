"""``percontrast score``: per-token PIR of every example, to JSON and an HTML heatmap.

    percontrast score --model smollm2-135m --data builtin:sample-test --task email --output-dir out/score
    percontrast score --model smollm2-135m --profile "I cycle to work" --profile @notes.txt
                      --input "Write about the weekend" --output "Cycling by the river."

Writes ``scores.json`` (per example: tokens, PIR, both log-probs, entropy, PerCE
weight, the profile items as they stood in the prompt) and ``heatmap.html``.
``--counterfactual swap`` replaces the profile with another user's instead of removing it
(separates "this user" from "any context"). ``--top-k N`` also keeps, for every response
token, the N most likely next tokens with and without the profile.

One-off scoring (``--profile``/``--input``/``--output`` instead of ``--data``) scores one
example and also prints its tokens coloured by PIR (plain token/PIR columns when stdout is
not a terminal). ``@path`` reads a value from a file (one trailing line break dropped);
``@@`` at the start stands for a literal ``@``. From Python: ``percontrast.score_text``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import field
from ..errors import UserError
from ..options import ModelDataOptions, check_clip

ONE_OFF_ID = "one-off"
_ONE_OFF_FLAGS = "--profile, --input and --output"


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
    top_k: int = field(0, help="Also store, for every response token, the N most likely next tokens with "
                       "and without the profile (top_with / top_without in scores.json: [token, probability] "
                       "pairs, highest first); 0: off, keeps scores.json small.")
    profile: list[str] = field(default_factory=list, help="One-off scoring, instead of --data: the text of a "
                               "profile item (several items: --profile A B, or the flag repeated; @path reads "
                               "one from a file). "
                               "With --task generic (the default) each text is an item {text: ...}; a task "
                               "whose items have one field gets it there; tasks with several fields refuse.")
    input: str = field("", help="One-off scoring: the task input (@path reads it from a file).")
    output: str = field("", help="One-off scoring: the response to score (@path reads it from a file).")

    def __post_init__(self):
        given = [f for f, v in (("--profile", self.profile), ("--input", self.input), ("--output", self.output)) if v]
        if given and self.data:
            raise UserError(f"give either --data or {_ONE_OFF_FLAGS} (one example), not both")
        if not given and not self.data:
            raise UserError(f"give --data (a records file, or builtin:sample-test), or {_ONE_OFF_FLAGS} "
                            "to score one example")
        if given:
            missing = [f for f in ("--profile", "--input", "--output") if f not in given]
            if missing:
                raise UserError(f"one-off scoring needs {_ONE_OFF_FLAGS}; missing: {', '.join(missing)}")
            if self.counterfactual == "swap":
                raise UserError("--counterfactual swap takes other users' profiles from a --data file; "
                                "one-off scoring can only remove the profile")
            if self.limit is not None:
                raise UserError("--limit applies to --data, not to one-off scoring")
            super(ModelDataOptions, self).__post_init__()  # the model and prompt checks; --data is not needed
            one_off_field(self.task)                        # refuse a task whose items need several fields
        else:
            super().__post_init__()
        check_clip(self.clip_min, self.clip_max, allow_negative=True)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def one_off(self) -> bool:
        """One example from --profile/--input/--output instead of a data file."""
        return not self.data


# ----------------------------------------------------------------------------- one-off records
def one_off_field(task_name: str) -> str:
    """The profile item field a one-off ``--profile`` text goes to: ``text`` for ``generic`` (any
    fields), the single field of a one-field task; a task whose items need several fields refuses."""
    from ..prompts import get_task
    task = get_task(task_name)
    if not task.fields:
        return "text"
    if len(task.fields) == 1:
        return task.fields[0]
    raise UserError(f"--task {task.name} reads profile items with fields {', '.join(task.fields)}, but a "
                    "--profile text is one field; use --task generic, or a --data file with those fields")


def read_value(value: str, flag: str) -> str:
    """``@path``: the file's text (UTF-8, one trailing line break dropped); ``@@x``: the literal ``@x``;
    anything else as it is."""
    if value.startswith("@@"):
        return value[1:]
    if not value.startswith("@"):
        return value
    from ..data import read_text_utf8
    path = Path(value[1:]).expanduser()
    try:
        text = read_text_utf8(path)
    except FileNotFoundError:
        raise UserError(f"{flag}: file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{flag}: {path} is a directory, not a file") from None
    except OSError as e:
        raise UserError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return text


def one_off_record(task_name: str, profile: list[str], input: str, output: str) -> dict:
    """The record of one example given as texts, validated like a data file's records."""
    from ..data import validate_records
    from ..prompts import get_task
    key = one_off_field(task_name)
    for i, text in enumerate(profile):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"--profile #{i + 1} is empty")
    for flag, text in (("--input", input), ("--output", output)):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{flag} is empty")
    record = {"id": ONE_OFF_ID, "input": input, "output": output, "profile": [{key: t} for t in profile]}
    return validate_records([record], get_task(task_name), "one-off example")[0]


def score_records(model, tokenizer, records: list[dict], builder, *, batch_size: int = 4,
                  clip_min: float = 0.8, clip_max: float = 5.0, profiles: list[list[dict]] | None = None,
                  progress: bool = True, top_k: int = 0, bucket: bool = True) -> list[dict]:
    """Per-example token scores (lists of floats), in record order; ``top_k`` > 0 adds ``top_with`` /
    ``top_without``: per response token, the top-k [token, probability] pairs, highest first.

    ``bucket`` (default): batches are formed from records of similar length (sorted by the length
    of the with-profile sequence), so a batch pays little padding; results come back in record
    order. A row's scores do not depend on what it is batched with beyond float rounding (masks
    and position ids make padding inert; tests/test_generation.py's argument), so this changes
    nothing but the time. ``bucket=False`` batches in record order (the benchmarks' "before")."""
    import torch
    from tqdm.auto import tqdm

    from ..encoding import PairedCollator
    from ..losses import clip_weights
    from ..scoring import score_batch

    model.eval()
    collate = PairedCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    # swap: the counterfactual prompt holds another user's profile instead of none
    enc = [builder.encode(r, counterfactual_profile=None if profiles is None else profiles[i])
           for i, r in enumerate(records)]
    for i, e in enumerate(enc):
        e["idx"] = i            # the collated batch's ``idx``: record positions, whatever the batch order
    if not batch_size:   # 0: chosen from memory, like generation's batch_size 0
        from ..generation import auto_batch_size, score_batch_cap
        batch_size = auto_batch_size(
            model, max((len(e["prompt_with"]) + len(e["response"]) for e in enc), default=1),
            logit_positions=max((len(e["response"]) for e in enc), default=1), cap=score_batch_cap(model))
    order = list(range(len(records)))
    if bucket:
        order.sort(key=lambda i: len(enc[i]["prompt_with"]) + len(enc[i]["response"]))
    results: list[dict | None] = [None] * len(records)
    decoded: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([enc[i] for i in idx]).items()}
        s = score_batch(model, batch, top_k=top_k)
        pir = s.pir
        w = clip_weights(pir, clip_min, clip_max)
        for b, i in enumerate(idx):
            n = len(enc[i]["response"])
            row = score_row(tokenizer, records[i], enc[i], pir[b, :n], s.logp_with[b, :n], s.logp_without[b, :n],
                            s.entropy[b, :n], w[b, :n])
            if top_k:
                row["top_with"] = _candidates(tokenizer, *s.top_with, b, n, decoded)
                row["top_without"] = _candidates(tokenizer, *s.top_without, b, n, decoded)
            results[i] = row
    return results  # type: ignore[return-value]


def score_row(tokenizer, record: dict, enc: dict, pir, logp_with, logp_without, entropy, weights) -> dict:
    """One example's row of ``score_records`` from its per-token tensors [n]."""
    return {"id": record["id"], "input": record["input"], "output": record["output"],
            "tokens": [tokenizer.decode([t]) for t in enc["response"]], "token_ids": enc["response"],
            "pir": pir.tolist(), "logp_with": logp_with.tolist(), "logp_without": logp_without.tolist(),
            "entropy": entropy.tolist(), "weights": weights.tolist(), "n_profile_items": enc["n_profile_items"],
            "profile_removed": enc["profile_removed"], "profile": enc["profile_shown"]}


def generate_and_score_records(model, tokenizer, records: list[dict], builder, options, *, batch_size: int | None = None,
                               clip_min: float = 0.8, clip_max: float = 5.0, progress: bool = True,
                               info: list | None = None) -> tuple[list[str], list[dict]]:
    """Greedy generations for records with gold responses and ``score_records``' rows of those golds,
    from one prefill per prompt (``generation.generate_and_score``). The prompts are the ones both
    ``generate_for`` and ``score_records`` build for such records (the prompt budget is max_length
    minus the gold length either way)."""
    from ..generation import generate_and_score
    from ..losses import clip_weights
    from ..pir import pir as pir_fn

    enc = [builder.encode(r) for r in records]
    ids, scores = generate_and_score(model, tokenizer, enc, options, batch_size=batch_size, progress=progress,
                                     info=info)
    rows = []
    for r, e, sc in zip(records, enc, scores):
        pir = pir_fn(sc["logp_with"], sc["logp_without"])
        rows.append(score_row(tokenizer, r, e, pir, sc["logp_with"], sc["logp_without"], sc["entropy"],
                              clip_weights(pir, clip_min, clip_max)))
    return [tokenizer.decode(g, skip_special_tokens=True).strip() for g in ids], rows


def _candidates(tokenizer, probs, ids, b: int, n: int, decoded: dict[int, str]) -> list[list[list]]:
    """Row ``b``'s first ``n`` positions of ``top_candidates`` as [[token string, probability], ...] lists."""
    out = []
    for row_ids, row_p in zip(ids[b, :n].tolist(), probs[b, :n].tolist()):
        for t in row_ids:
            if t not in decoded:
                decoded[t] = tokenizer.decode([t])
        out.append([[decoded[t], p] for t, p in zip(row_ids, row_p)])
    return out


def _score(cfg: ScoreConfig, records: list[dict], *, progress: bool = True) -> tuple[list[dict], dict]:
    """The command's work on loaded records: (per-example results, summary). ``run`` and
    ``score_text`` both come through here."""
    from ..retrieval import other_user_profiles

    model, tok = cfg.load_model(device="default")
    builder = cfg.prompt_builder(tok)
    profiles = other_user_profiles(records, cfg.seed) if cfg.counterfactual == "swap" else None
    results = score_records(model, tok, records, builder, batch_size=cfg.batch_size, clip_min=cfg.clip_min,
                            clip_max=cfg.clip_max, profiles=profiles, progress=progress, top_k=cfg.top_k)
    all_pir = [v for r in results for v in r["pir"]]
    summary = {"examples": len(results), "tokens": len(all_pir),
               "mean_pir": sum(all_pir) / len(all_pir),
               "share_pir_above_min": sum(v > cfg.clip_min for v in all_pir) / len(all_pir),
               "counterfactual": cfg.counterfactual, "counterfactual_prompt": cfg.counterfactual_prompt,
               **builder.stats.counts()}
    builder.stats.warn()
    return results, summary


def run(cfg: ScoreConfig) -> dict:
    from ..datasets import load_records
    from ..files import write_text_atomic
    from ..heatmap import render
    from ..prompts import get_task
    from ..runinfo import run_info

    out = Path(cfg.output_dir)
    targets = [out / "scores.json"] + ([out / "heatmap.html"] if cfg.html else [])
    if not cfg.overwrite and any(t.exists() for t in targets):
        raise UserError(f"{out} already has scores; pass --overwrite to replace them")
    if cfg.one_off:
        records = [one_off_record(cfg.task, [read_value(p, "--profile") for p in cfg.profile],
                                  read_value(cfg.input, "--input"), read_value(cfg.output, "--output"))]
    else:
        records = load_records(cfg.data, get_task(cfg.task), limit=cfg.limit)
    results, summary = _score(cfg, records)
    payload = {"summary": summary, "run": run_info(cfg), "examples": results}
    write_text_atomic(out / "scores.json", json.dumps(payload, ensure_ascii=False))
    if cfg.html:
        write_text_atomic(out / "heatmap.html", render(results, title=f"PerContrast scores: {cfg.model}",
                                                       clip_min=cfg.clip_min, clip_max=cfg.clip_max,
                                                       counterfactual=cfg.counterfactual))
    if cfg.one_off:
        print_tokens(results[0], clip_min=cfg.clip_min)
    return summary


# ----------------------------------------------------------------------------- Python, one call
def score_text(profile: list[str] | str, input: str, output: str, **options) -> list[dict]:
    """PIR of each token of ``output`` for one example, in one call:

        from percontrast import score_text
        for t in score_text(profile=["I cycle to work", "vegetarian"], input="Write about the weekend",
                            output="Cycling by the river, then falafel.", model="tiny-random"):
            print(f"{t['token']!r:>12} {t['pir']:+.3f}")

    ``options`` are ``ScoreConfig`` fields (``model``, ``task``, ``k``, ``max_length``, ``dtype``,
    ``clip_min``, ``top_k``, ...). Runs the ``score`` command's own code on the record
    ``{"profile": [{"text": p} ...], "input", "output"}`` (see ``one_off_field`` for other tasks) and
    writes no files; the texts are taken as they are (no ``@path`` reading). Returns one dict per
    response token: ``token``, ``token_id``, ``pir``, ``logp_with``, ``logp_without``, ``entropy``,
    ``weight`` (clip(PIR, clip_min, clip_max)), and with ``top_k`` ``top_with`` / ``top_without``.
    """
    from ..config import build
    if isinstance(profile, str):
        profile = [profile]
    cfg = build(ScoreConfig, {**options, "profile": list(profile), "input": input, "output": output},
                source="score_text")
    results, _ = _score(cfg, [one_off_record(cfg.task, cfg.profile, cfg.input, cfg.output)], progress=False)
    return token_rows(results[0])


def token_rows(example: dict) -> list[dict]:
    """One scores.json example as one dict per response token."""
    keys = ("token_ids", "pir", "logp_with", "logp_without", "entropy", "weights", "top_with", "top_without")
    names = ("token_id", "pir", "logp_with", "logp_without", "entropy", "weight", "top_with", "top_without")
    cols = [(name, example[key]) for key, name in zip(keys, names) if key in example]
    return [{"token": tok, **{name: col[i] for name, col in cols}} for i, tok in enumerate(example["tokens"])]


# ----------------------------------------------------------------------------- terminal output
PIR_SCALE = 3.0   # |PIR| (nats) at full colour, as in heatmap.html


def _style(v: float) -> str:
    """The explorer's blue-orange colours (colour-blind safe), white text on the two darkest levels."""
    from ..heatmap import BLUE, ORANGE, pir_colour
    bg = pir_colour(v, PIR_SCALE)
    if bg is None:
        return ""
    dark = bg in (ORANGE[-2:] + BLUE[-2:])
    return f"{'#ffffff' if dark else '#000000'} on {bg}"


def print_tokens(example: dict, *, clip_min: float = 0.8, file=None) -> None:
    """The response tokens coloured by PIR with ``rich`` on a terminal; plain ``token<TAB>pir`` lines
    (each token as a JSON string) otherwise."""
    file = file or sys.stdout
    pirs = example["pir"]
    mean = sum(pirs) / len(pirs)
    if not file.isatty():
        lines = ["token\tpir"] + [f"{json.dumps(t, ensure_ascii=False)}\t{v:+.4f}"
                                   for t, v in zip(example["tokens"], pirs)]
        print("\n".join(lines), file=file)
        return
    from rich.console import Console
    from rich.text import Text
    text = Text()
    for t, v in zip(example["tokens"], pirs):
        text.append(t.replace("\n", "\u21b5\n"), style=_style(v))
    console = Console(file=file, highlight=False, soft_wrap=True)
    console.print(text)
    legend = Text()
    legend.append("orange", style=_style(PIR_SCALE))
    legend.append(": the profile made the token more likely, ")
    legend.append("blue", style=_style(-PIR_SCALE))
    legend.append(f": less likely; full colour at |PIR| >= {PIR_SCALE:g} nats. {len(pirs)} tokens, "
                  f"mean PIR {mean:+.3f}, {sum(v > clip_min for v in pirs)} above {clip_min:g}.")
    console.print(legend)
