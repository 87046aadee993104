"""``percontrast compare``: train and evaluate every method x seed from one YAML file.

    percontrast compare --config configs/compare/sample.yaml

Methods: ``base_profile`` / ``base_noprofile`` (the model as loaded, with / without the
profile in the prompt), ``copy_retrieved`` (no model: the first shown profile item as the
prediction), ``ce``, ``lossce``, ``entce``, ``perce`` and the others of ``losses.METHODS``;
``X+contrast`` / ``X+noprofile`` decode X's model with profile-contrastive decoding / without the
profile; ``method_learning_rates`` gives named models their own rate. Every trained method
gets the same training data, the same ``train:`` settings (TrainConfig fields: budget,
LoRA or full, batch size, ...) and the same decoding; only ``method`` changes. Optional
grids: ``learning_rates`` and ``clips`` ("m:M") for the learning-rate / clip robustness
study, and several ``eval_sets`` (cross-task transfer: train on one task's data,
evaluate on each).

Output (``output_dir``): ``cells/<key>.json`` per finished (method, seed, lr, clip, eval
set), written atomically and reused on a rerun (resume) only when the hash of everything
that defines the cell (settings, model, data content, decoding, prompt) still matches;
with ``train: {save_steps: N}``, ``_train/<method>__seed<s>__lr<lr>/`` holds the checkpoints of the
model being trained, so a stopped run resumes mid-training (``train_model``);
``results.json`` and ``results.md`` (per method: mean over seeds with a 95% t-interval;
against ``ce``, on the seeds both have, paired by seed and example: the mean difference
with a bootstrap interval over examples and one over seeds then examples, and the
relative gain in %; wall time, peak memory) and ``results.png``. Everything is checked
(methods, metrics, data files, train settings, stale cells) before the first training step.

``judge`` (a model spec or a server URL, ``JudgeOptions``) adds the LLM judge of personalization
(``judge.py``) to every generating cell: per example ``judge`` / ``judge_mass`` beside the other
scores. The judge's identity (spec or URL, served model, API, rubric version) is part of each
cell's definition; a cell that differs from the current config ONLY in its judge keeps its
predictions and is re-judged (no training, no generation), so adding or changing a judge on a
finished study costs only the judging.

This module is the run loop: the config, the plan (which models to build, which cells each
fills), the cell hashes and their check on resume, training and evaluating the missing cells,
and ``run``. The statistics, tables and plot come from ``compare_report``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import field
from ..errors import UserError
from ..files import write_text_atomic
from ..metrics import DEFAULT_METRICS, check_metrics
from ..options import DecodingOptions, JudgeOptions, ModelDataOptions
from .compare_report import (ALL_METHODS, BASE_METHODS, CONTRAST_SUFFIX, COPY_BASELINE, DEFAULT_METHODS,
                             NOPROFILE_SUFFIX, REFERENCE, TRAINED_METHODS, VARIANT_SEP, is_base, model_method, plot,
                             plot_curves, render_markdown, report_metrics, summarize, train_method, uses_clip,
                             uses_profile, variant_of)

# TrainConfig fields that compare owns (set per cell or shared from the top level)
_OWNED = {"method", "seed", "learning_rate", "clip_min", "clip_max", "output_dir", "resume", "overwrite",
          "model", "data", "task", "k", "retriever", "max_length", "limit", "dtype", "trust_remote_code"}


def resolve_eval_sets(test_data: str | None, task: str, test_limit: int | None, eval_sets: list[dict]) -> list[dict]:
    """Every eval set as {name, data, task, limit}: ``test_data`` as set 'test', then ``eval_sets``
    (name: its own or the data file's stem; task: its own or the config's). Also what study_pairs
    reads back from a run's compare_config.json."""
    sets = [{"name": "test", "data": test_data, "task": task, "limit": test_limit}] if test_data else []
    for es in eval_sets:
        name = es.get("name") or Path(str(es["data"])).stem
        sets.append({"name": str(name), "data": str(es["data"]), "task": es.get("task", task),
                     "limit": es.get("limit")})
    return sets


@dataclass
class CompareConfig(JudgeOptions, ModelDataOptions, DecodingOptions):   # judge flags listed last
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS),
                               help="Methods to compare: " + ", ".join(ALL_METHODS) + "; X+contrast (e.g. "
                               "perce+contrast, base_profile+contrast): X's model decoded with profile-contrastive "
                               "decoding at --contrast-arm-alpha, a separate arm on the same trained model; "
                               "X+noprofile (trained X): X's model decoded WITHOUT the profile in the prompt; "
                               "X@NAME: trained method X with the TrainConfig overrides of variants[NAME]; "
                               f"{COPY_BASELINE}: no model, the first profile item shown in the prompt as the "
                               "prediction (cut to max_new_tokens).")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], help="Training seeds.")
    variants: dict = field(default_factory=dict, help="YAML: named training variants, e.g. {norm: {normalize: "
                           "weights}, every4: {refresh: every_k, refresh_every: 4}}: TrainConfig overrides on top of "
                           "train:, run as arm X@name (perce@norm) beside X in the same table; the clip is the clips "
                           "grid's, not a variant's.")
    method_seeds: dict = field(default_factory=dict, help="YAML: fewer seeds for some trained arms, e.g. {lossce: "
                               "[0, 1, 2], perce+contrast: [0]} (a subset of seeds); arms not named use every seed.")
    test_data: str = field("", help="Test records (evaluated as eval set 'test'); or give eval_sets in YAML.")
    test_limit: int | None = field(None, help="Use only the first N test records (a capped test set).")
    eval_sets: list[dict] = field(default_factory=list, help="YAML: list of {name, data, task (default: the "
                                  "training task), limit} to evaluate every trained model on (cross-task).")
    train: dict = field(default_factory=dict, help="YAML: TrainConfig fields shared by all trained methods "
                        "(max_steps, epochs, lora, batch_size, learning_rate, ...).")
    learning_rates: list[float] = field(default_factory=list, help="Learning-rate grid (empty: train.learning_rate).")
    method_learning_rates: dict = field(default_factory=dict, help="YAML: a learning rate per trained model, e.g. "
                                        "{ce: 0.001, perce: 0.003}: each method at the rate IT chose on validation, "
                                        "side by side in one table (models not named use the grid's rate; with at "
                                        "most one rate in learning_rates).")
    clips: list[str] = field(default_factory=list, help="Clip grid as m:M (e.g. 0.8:5 0.5:5); empty: train's "
                             "clip_min/clip_max. Applies to perce/lossce/entce; ce ignores it.")
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS), help="Metrics to report.")
    bootstrap_resamples: int = field(10000, help="Resamples of each bootstrap interval of the difference to ce "
                                     "(examples only; seeds then examples), RNG seed 0.")
    output_dir: str = field("out/compare", help="Cells, results.md/json and results.png go here.")
    progress: bool = field(True, help="Show progress bars.")
    summarize_only: bool = field(False, help="Only rebuild results.md/json/png from the finished cells; "
                                 "train and evaluate nothing (e.g. after a time-boxed run).")
    dry_run: bool = field(False, help="Print the plan and exit: every model to train (method, seed, lr, clip), "
                          "its cells finished / reusable / to do, and an interrupted training's last checkpoint "
                          "(step, seconds trained). Trains, evaluates and writes nothing.")
    generate: bool = field(True, help="Generate and score with the overlap metrics; --no-generate: likelihood "
                           "metrics only (no decoding: cheap and low-noise, e.g. a learning-rate search on validation).")
    likelihood: bool = field(False, help="Also score the gold responses (no generation): NLL/token with the "
                             "profile, mean PIR, and NLL on personal tokens (the gold tokens the untrained model "
                             "gives PIR > 0.8, fixed once for every arm) vs the other tokens.")
    specific_tokens: bool = field(False, help="With --likelihood: also NLL on the gold tokens SPECIFIC to the "
                                  "record's user against the other evaluated users' profile texts (nll_specific / "
                                  "nll_nonspecific; specificity.py: a word-level log-odds test, independent of any "
                                  "model or method), beside the PIR-defined personal tokens.")
    attribution: bool = field(False, help="Also attribute each generation to a user with a char n-gram classifier "
                              "trained on the eval set's profile texts: share attributed to its own user.")
    repetition: bool = field(False, help="Also report repetition: seq_rep_4 (per generation) and distinct_2 "
                             "(pooled), and the same with the n-gram ban off (noban_*: every example decoded a "
                             "second time with no_repeat_ngram_size 0, so loops the ban hides can show).")
    copy_control: bool = field(False, help="Also report copying: copy_rate (share of a generation's word 4-grams "
                               "found in the profile items shown in its prompt), copy_span (longest copied run, "
                               "words), and own-author attribution by a classifier that never saw the items shown "
                               "in that example's prompt (attributed_loo, and its per-user mean attributed_loo_macro).")
    contrast_arm_alpha: float = field(1.0, help="alpha of the X+contrast arms (profile-contrastive decoding).")
    reuse_cells_from: list[str] = field(default_factory=list, help="Other compare output_dirs whose finished "
                                        "cells are copied in when their settings hash equals this config's cell "
                                        "(e.g. an ablation reusing the main study's ce and perce cells).")
    adopt_unhashed_cells: bool = field(False, help="Reuse cells written before cells carried a settings hash, "
                                       "taking your word that they were made with this config (they are "
                                       "listed in results.json/md). Without it such cells are refused.")

    def __post_init__(self):
        super().__post_init__()  # each option group checks its own fields (decoding too)
        self._check_variants()
        bad = [m for m in self.methods if not self._known_arm(m)]
        if bad or not self.methods:
            raise UserError(f"unknown method {', '.join(map(repr, bad)) or '(none given)'}; "
                            f"known: {', '.join(ALL_METHODS)}, X{CONTRAST_SUFFIX} for a model with the profile, "
                            f"X{NOPROFILE_SUFFIX} for a trained X, and X{VARIANT_SEP}NAME for a trained X and a "
                            "name in variants "
                            f"({', '.join(self.variants) or 'none defined'})")
        self.methods = list(dict.fromkeys(self.methods))
        if self.dry_run and self.summarize_only:
            raise UserError("--dry-run writes nothing and --summarize-only writes the tables: give one")
        if not self.generate and not self.likelihood:
            raise UserError("--no-generate measures nothing without --likelihood")
        if self.specific_tokens and not self.likelihood:
            raise UserError("specific_tokens is a likelihood metric: add --likelihood")
        if not self.generate and (self.attribution or self.repetition or self.copy_control
                                  or any(m != model_method(m) or m == COPY_BASELINE for m in self.methods)):
            raise UserError(f"attribution, repetition, copy_control and the X+contrast, X+noprofile and "
                            f"{COPY_BASELINE} arms need generations: drop --no-generate")
        if not self.generate and self.judge:
            raise UserError("--judge scores generations: drop --no-generate")
        if self.contrast_arm_alpha <= 0:
            raise UserError("contrast_arm_alpha must be > 0")
        self.metrics = list(check_metrics(self.metrics))
        if not self.seeds:
            raise UserError("seeds: give at least one seed")
        for arm, seeds in self.method_seeds.items():
            if arm not in self.methods or is_base(arm):
                raise UserError(f"method_seeds: {arm!r} is not a trained arm in methods ({', '.join(self.methods)})")
            if not isinstance(seeds, list) or not seeds or not set(seeds) <= set(self.seeds):
                raise UserError(f"method_seeds.{arm}: give a non-empty list drawn from seeds {self.seeds}; "
                                f"got {seeds!r}")
        if not self.test_data and not self.eval_sets:
            raise UserError("give test_data or eval_sets")
        if self.bootstrap_resamples < 100:
            raise UserError("bootstrap_resamples must be >= 100")
        if self.test_limit is not None and self.test_limit < 1:
            raise UserError("test_limit must be >= 1")
        for i, es in enumerate(self.eval_sets):
            unknown = set(es) - {"name", "data", "task", "limit"}
            if unknown or not es.get("data"):
                raise UserError(f"eval_sets[{i}]: need keys name, data (optional task, limit); "
                                f"got {sorted(es)}")
        names = [s["name"] for s in self.eval_sets_resolved()]
        if len(set(names)) != len(names):
            raise UserError(f"eval_sets: duplicate names {names}")
        for c in self.clips:
            parse_clip(c)
        if any(lr <= 0 for lr in self.learning_rates):
            raise UserError("learning_rates must be > 0")
        if self.method_learning_rates:
            models = {model_method(m) for m in self.methods if not is_base(m)}
            for m, lr in self.method_learning_rates.items():
                if m not in models:
                    raise UserError(f"method_learning_rates: {m!r} is not a trained model in methods "
                                    f"({', '.join(sorted(models)) or 'none'})")
                if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
                    raise UserError(f"method_learning_rates.{m}: give a learning rate > 0, got {lr!r}")
            if len(self.learning_rates) > 1:
                raise UserError("method_learning_rates sets each named model's rate: give at most one rate in "
                                "learning_rates (a grid and per-method rates do not combine)")
        self.train_config(REFERENCE, self.seeds[0])  # validates the train: block now (unknown keys, values)
        for arm in self.methods:                      # and each variant's values on top of it
            if variant_of(arm):
                self.train_config(model_method(arm), self.seeds[0])

    # -- derived -------------------------------------------------------------------
    def _check_variants(self) -> None:
        from .train import TrainConfig
        known = {f.name for f in dataclasses.fields(TrainConfig)} - _OWNED
        for name, over in self.variants.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
                raise UserError(f"variants: name {name!r} must be letters, digits, _ . or -")
            if not isinstance(over, dict) or not over:
                raise UserError(f"variants.{name}: give a mapping of TrainConfig fields, e.g. {{normalize: weights}}")
            bad = sorted(set(over) - known)   # known excludes compare's own fields: lr, clip, seed, method ...
            if bad:
                raise UserError(f"variants.{name}: keys {bad} cannot be set by a variant (unknown, or set per "
                                "grid point: learning_rates / clips)")

    def _known_arm(self, arm: str) -> bool:
        if arm != model_method(arm):   # a decoding suffix
            if train_method(arm) in ("base_noprofile", COPY_BASELINE):
                return False           # nothing to contrast / no model
            if arm.endswith(NOPROFILE_SUFFIX) and is_base(arm):
                return False           # base_profile+noprofile is base_noprofile
        name = variant_of(arm)
        if name is None:
            return model_method(arm) in ALL_METHODS
        return train_method(arm) in TRAINED_METHODS and name in self.variants

    def seeds_for(self, arm: str) -> list[int]:
        return self.method_seeds.get(arm, self.seeds)

    def eval_sets_resolved(self) -> list[dict]:
        return resolve_eval_sets(self.test_data, self.task, self.test_limit, self.eval_sets)

    def settings(self) -> list[dict]:
        """The (learning rate, clip) grid; each point is a separate set of trained models."""
        base = self.train_config(REFERENCE, self.seeds[0])
        lrs = self.learning_rates or [base.learning_rate]
        clips = [parse_clip(c) for c in self.clips] or [(base.clip_min, base.clip_max)]
        return [{"lr": lr, "clip_min": m, "clip_max": M} for lr in lrs for (m, M) in clips]

    def setting_for(self, method: str, setting: dict | None) -> dict | None:
        """The grid point as ``method``'s model trains at it: its own learning rate when
        method_learning_rates names it."""
        lr = self.method_learning_rates.get(model_method(method))
        return setting if setting is None or lr is None else {**setting, "lr": float(lr)}

    def train_config(self, method: str, seed: int, lr: float | None = None, clip: tuple | None = None,
                     output_dir: str = "out/compare/_train"):
        from .. import config as cfgmod
        from .train import TrainConfig

        owned = sorted(set(self.train) & _OWNED - {"learning_rate", "clip_min", "clip_max"})
        if owned:
            raise UserError(f"train: keys {owned} are set by compare itself (top level / per cell)")
        values = dict(self.train)
        values.update(self.variants.get(variant_of(method), {}))   # None (a plain method) names no variant
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelDataOptions)}
        values.update(shared, method=train_method(method), seed=seed, output_dir=output_dir, overwrite=True,
                      progress=False)
        if lr is not None:
            values["learning_rate"] = lr
        if clip is not None:
            values["clip_min"], values["clip_max"] = clip
        source = f"compare config: train + variants.{variant_of(method)}" if variant_of(method) else \
            "compare config: train"
        return cfgmod.build(TrainConfig, values, source=source)


def parse_clip(text: str) -> tuple[float, float]:
    m = re.fullmatch(r"\s*(-?[0-9.eE+-]+)\s*:\s*(-?[0-9.eE+-]+)\s*", str(text))
    try:
        lo, hi = float(m.group(1)), float(m.group(2))  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        raise UserError(f"clips: {text!r} is not m:M (e.g. 0.8:5)") from None
    if lo > hi:
        raise UserError(f"clips: {text!r}: m must be <= M")
    return lo, hi


# ---------------------------------------------------------------- cells

def _train_dir_name(method: str, seed: int, setting: dict) -> str:
    clip = f"__clip{setting['clip_min']:g}-{setting['clip_max']:g}" if uses_clip(method) else ""
    return f"{method}__seed{seed}__lr{setting['lr']:g}{clip}"


def cell_key(method: str, seed: int, setting: dict, eval_name: str, trained: bool) -> str:
    if not trained:  # the base model does not depend on lr / clip
        return f"{method}__seed{seed}__{eval_name}"
    clip = f"__clip{setting['clip_min']:g}-{setting['clip_max']:g}" if uses_clip(method) else ""
    return f"{method}__seed{seed}__lr{setting['lr']:g}{clip}__{eval_name}"


# What a cell's hash leaves out, and why: where files go and how chatty the run is do not
# change a trained model or its outputs; data/limit are replaced by the content digest of
# the records actually used (moving the data folder must not invalidate cells, editing it
# must); fast is the same computation by a faster route (tested equal to the naive one).
_NOT_DEFINING_TRAIN = {"output_dir", "resume", "overwrite", "progress", "logging_steps", "save_steps",
                       "save_total_limit", "fast", "report"}
_NOT_DEFINING_SHARED = {"data", "limit", "trust_remote_code"}
_CLIP_FIELDS = {"clip_min", "clip_max", "allow_negative_clip"}
# Training options added after cells existed: in a cell's definition only when set away from the
# default they were added with, so that every earlier cell keeps its hash (its run had that default).
_LATER_TRAIN_DEFAULTS = {"group_by_length": False, "keep_best": False, "early_stopping_patience": 0,
                         "early_stopping_threshold": 0.0}
TRAIN_RECORDS = "__train__"  # key of the training records in the digests


def digest(obj) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): equal content, equal digest."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cell_definition(cfg: CompareConfig, method: str, seed: int, setting: dict | None, es: dict,
                    digests: dict[str, str], judge: dict | None = None) -> dict:
    """Everything that decides a cell's predictions and scores; its digest is the cell's ``config_hash``.

    ``setting`` is None for an untrained method. Trained methods carry the full resolved
    TrainConfig (defaults included, so a changed default also counts as a change). ``judge``
    (``JudgeOptions.judge_description()``) is added only when there is one, so cells made
    without a judge keep their hashes."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelDataOptions)
              if f.name not in _NOT_DEFINING_SHARED}
    decoding = dataclasses.asdict(arm_decoding(cfg, method)) if cfg.generate else None
    d = {"method": method, "seed": seed, "shared": shared, "decoding": decoding,
         "eval_set": {"name": es["name"], "task": es["task"], "records_sha256": digests[es["name"]]},
         "train": None}
    if setting is not None:
        tcfg = cfg.train_config(model_method(method), seed, setting["lr"], (setting["clip_min"], setting["clip_max"]))
        skip = _NOT_DEFINING_TRAIN | set(shared) | _NOT_DEFINING_SHARED | (set() if uses_clip(method)
                                                                          else _CLIP_FIELDS)
        skip |= {"threshold_margin"} if train_method(method) != "threshold" else set()
        d["train"] = {"records_sha256": digests[TRAIN_RECORDS],
                      "config": {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in skip
                                 and not (k in _LATER_TRAIN_DEFAULTS and v == _LATER_TRAIN_DEFAULTS[k])}}
    if judge is not None:
        d["judge"] = judge
    return d


def arm_decoding(cfg: CompareConfig, arm: str) -> DecodingOptions:
    """The decoding an arm uses: the shared options, with contrast at contrast_arm_alpha for X+contrast."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DecodingOptions)}
    if arm.endswith(CONTRAST_SUFFIX):
        values["contrast_alpha"] = cfg.contrast_arm_alpha
    return DecodingOptions(**values)


def _changed_paths(a, b, prefix: str = "") -> list[str]:
    """Dotted paths where two definitions differ (for the refusal message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _changed_paths(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _judge_only(changed: list[str]) -> bool:
    return bool(changed) and all(p == "judge" or p.startswith("judge.") for p in changed)


def read_cell(path: Path, definition: dict, cfg: CompareConfig, rejudge_ok: bool = False) -> dict:
    """A finished cell, checked against the cell the current config would compute.

    Reusing a cell made with other settings would mix two experiments in one table, so
    any mismatch is one UserError naming the file and the way out. With ``rejudge_ok``, a
    cell that differs only in its judge comes back marked ``rejudge``: its predictions stand,
    only its judge scores are recomputed."""
    try:
        cell = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable cell ({e}); delete it to recompute it") from None
    stored = cell.get("config_hash")
    if stored is None and not cfg.adopt_unhashed_cells:
        raise UserError(f"{path}: cell has no settings hash (written by an older percontrast), so it cannot be "
                        "checked against this config; delete it to recompute it, use a new output_dir, or pass "
                        "--adopt-unhashed-cells if you know it was made with exactly these settings")
    if stored is not None and stored != digest(definition):
        changed = _changed_paths(cell.get("definition") or {}, json.loads(json.dumps(definition, default=str)))
        if _judge_only(changed) and cell.get("definition") is not None:
            if rejudge_ok:
                cell["rejudge"] = True
                return cell
            raise UserError(f"{path}: cell was judged with another judge than this config's (changed: "
                            f"{', '.join(changed[:4])}); rerun without --summarize-only to re-judge its predictions")
        shown = ", ".join(changed[:4]) + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "") \
            if changed else "not recorded"
        raise UserError(f"{path}: cell was computed with other settings than this config (changed: {shown}); "
                        "delete it to recompute it, or use a new output_dir to keep both")
    missing = [m for m in report_metrics(cfg) if m not in cell.get("metrics", {})]
    if missing:
        raise UserError(f"{path}: cell has no {', '.join(missing)} scores; delete it to recompute it, "
                        "or use a new output_dir")
    cell["unhashed"] = stored is None
    return cell


def record_digests(train_records: list[dict], eval_records: dict[str, list[dict]]) -> dict[str, str]:
    """Content digests of the records each cell is trained / evaluated on (after limits)."""
    out = {name: digest(recs) for name, recs in eval_records.items()}
    out[TRAIN_RECORDS] = digest(train_records)
    return out


class PeakMemory:
    """Peak memory while the block runs: CUDA max_memory_allocated on GPU, else the
    process RSS sampled every 50 ms (a sampler, so very short spikes can be missed)."""

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        proc = psutil.Process()
        self._stop = threading.Event()

        def sample():
            while True:
                self.peak = max(self.peak, proc.memory_info().rss)
                if self._stop.wait(0.05):
                    break
        self.peak = proc.memory_info().rss
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        return False

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.cuda else "rss"


class _NoSave:
    """Trainer callback: compare keeps the trained model in memory, no checkpoints on disk."""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return self._hook
        raise AttributeError(name)

    @staticmethod
    def _hook(args, state, control, **kwargs):
        control.should_save = False
        return control


# A checkpointed job's folder (``train: {save_steps: N}``): JOB_FILE names the training it belongs
# to, FINAL holds the trained (kept) model and its info once training ended, so that a run stopped
# during the evaluations does not train that model again.
JOB_FILE, FINAL, FINAL_INFO = "compare_job.json", "final", "compare_train_info.json"


class _TrainClock:
    """Training seconds summed over interruptions: at each checkpoint, the seconds trained up to
    it (this process's plus those of the checkpoint it resumed from), in JOB_FILE's ``train_s``."""

    def __init__(self, out: Path, before: float):
        self.out, self.before, self.t0 = out, before, time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.t0

    def __getattr__(self, name):
        if name.startswith("on_"):
            return self._noop
        raise AttributeError(name)

    @staticmethod
    def _noop(*a, **k):
        return None

    def on_save(self, args, state, control, **kw):
        # on_save runs after the checkpoint is published, so the step named here exists
        job = json.loads((self.out / JOB_FILE).read_text()) if (self.out / JOB_FILE).is_file() else {}
        job.setdefault("train_s", {})[str(state.global_step)] = round(self.elapsed(), 2)
        write_text_atomic(self.out / JOB_FILE, json.dumps(job, indent=1))


def claim_train_dir(out: Path, job_digest: str) -> None:
    """Make ``out`` the folder of this training job: kept as it is when it already belongs to it
    (an interrupted run of the same job), emptied when it holds another job's checkpoints."""
    import shutil

    job_file = out / JOB_FILE
    if out.exists():
        try:
            same = json.loads(job_file.read_text()).get("job") == job_digest
        except (OSError, ValueError, AttributeError):
            same = False
        if same:
            return
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_text_atomic(job_file, json.dumps({"job": job_digest}, indent=1))


def _load_final(tcfg, final: Path):
    """The model a checkpointed job saved when its training ended: the base model with the saved
    LoRA adapter on top (loaded on the base as this config names it, not as the adapter recorded
    it), or the saved fully fine-tuned weights."""
    from ..models import load_model

    if tcfg.lora:
        from peft import PeftModel
        base, tok = tcfg.load_model()
        model = PeftModel.from_pretrained(base, str(final))
    else:
        model, tok = load_model(str(final), dtype=tcfg.dtype, trust_remote_code=tcfg.trust_remote_code)
    return model, tok


def train_model(tcfg, records: list[dict]):
    """Train one model (a fresh copy of the base model) with ``build_trainer``; return
    (model, tokenizer, info). Tests monkeypatch this to count training calls.

    With ``tcfg.save_steps > 0`` the job is checkpointed in ``tcfg.output_dir`` (claimed for it by
    ``claim_train_dir``): a rerun resumes from the latest checkpoint (the Trainer restores weights,
    optimizer, scheduler, RNG and data position; the PerCE state and the kept-best snapshot come
    back from percontrast_state.pt, so the result is the uninterrupted run's), and once training
    has ended the trained model is saved in ``final/``, so a rerun evaluates it without training."""
    import transformers

    from ..checkpointing import latest_checkpoint
    from ..files import building_dir
    from .train import build_trainer, training_outcome

    out = Path(tcfg.output_dir)
    checkpointed = tcfg.save_steps > 0
    if checkpointed and (out / FINAL / FINAL_INFO).is_file():
        model, tok = _load_final(tcfg, out / FINAL)
        info = json.loads((out / FINAL / FINAL_INFO).read_text())
        model.eval()
        return model, tok, info
    transformers.set_seed(tcfg.seed)
    model, tok = tcfg.load_model()
    resume = latest_checkpoint(out) if checkpointed else None
    before = 0.0
    if resume is not None:
        step = resume.rsplit("-", 1)[1]
        before = json.loads((out / JOB_FILE).read_text()).get("train_s", {}).get(step, 0.0)
    clock = _TrainClock(out, before)
    trainer, builder = build_trainer(tcfg, model, tok, records, callbacks=[clock] if checkpointed else [_NoSave()])
    from pickle import UnpicklingError
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except (UserError, UnpicklingError) as e:
        if resume is None:
            raise
        # as train --resume: a checkpoint file that is not plain tensors is refused, never run
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{first} (compare resumed {resume}; delete {out} to train this model again)") from None
    info = {"steps": trainer.state.global_step, "train_loss": result.training_loss,
            "train_s": round(clock.elapsed(), 2), "response_cut": builder.stats.response_cut,
            "log": [h for h in trainer.state.log_history if "loss" in h][-50:],
            "curve": [[h["step"], h["val_nll"]] for h in trainer.state.log_history if "val_nll" in h],
            **training_outcome(trainer)}   # keep_best / early stopping: best_step, best_val_nll, stopped_early
    if resume is not None:
        info["resumed_from_step"] = int(resume.rsplit("-", 1)[1])
    model = trainer.model
    model.eval()
    if checkpointed:
        with building_dir(out / FINAL) as tmp:
            trainer.save_model(str(tmp))      # the LoRA adapter, or the whole model, + tokenizer
            write_text_atomic(tmp / FINAL_INFO, json.dumps(info, indent=1, default=str))
    return model, tok, info


def load_base(cfg: CompareConfig):
    return cfg.load_model()


# ---------------------------------------------------------------- run

def _jobs(cfg: CompareConfig, settings: list[dict], base_seeds: list[int]) -> list[tuple]:
    """(method, seed, setting or None) per model to build, seed-major: every method for the
    first seed, then the next seed ..., so an interrupted or time-boxed run still has
    complete method comparisons for the seeds done."""
    models = list(dict.fromkeys(model_method(m) for m in cfg.methods))   # X and X+contrast share X's model
    jobs = [(m, base_seeds[0], None) for m in models if m in BASE_METHODS]
    for i, s in enumerate(cfg.seeds):
        if i > 0:
            jobs += [(m, s, None) for m in models if m in BASE_METHODS and s in base_seeds]
        for st_i, st in enumerate(settings):
            for m in models:
                if m in BASE_METHODS:
                    continue
                # ce ignores the clip: train it once per learning rate
                if not uses_clip(m) and any(x["lr"] == st["lr"] for x in settings[:st_i]):
                    continue
                jobs.append((m, s, cfg.setting_for(m, st)))
    return jobs


def _reusable(cfg, name: str, definition: dict) -> Path | None:
    """The first cell of that name under a reuse_cells_from folder that was computed with exactly this
    cell's settings (same hash); a cell of another experiment there is not an error, just not ours."""
    for folder in cfg.reuse_cells_from:
        cand = Path(folder) / "cells" / name
        if cand.exists():
            try:
                read_cell(cand, definition, cfg)
            except UserError:
                continue
            return cand
    return None


def _plan(cfg, jobs, eval_sets, digests, out: Path, judge: dict | None = None) -> list[dict]:
    """Per job: its cells (eval set, file, definition) and which are already finished (or finished
    but to be re-judged). Every finished cell is checked against the current config here, before
    any training."""
    plan = []
    for m, s, st in jobs:
        cells = []
        for arm in (a for a in cfg.methods if model_method(a) == m):
            if st is not None and s not in cfg.seeds_for(arm):
                continue   # a job whose arms all skip this seed has no cells and trains nothing
            for es in eval_sets:
                path = out / "cells" / f"{cell_key(arm, s, st or {}, es['name'], st is not None)}.json"
                definition = cell_definition(cfg, arm, s, st, es, digests, judge)
                reuse, rejudge = None, False
                if path.exists():
                    rejudge = read_cell(path, definition, cfg, rejudge_ok=not cfg.summarize_only).get("rejudge", False)
                else:
                    reuse = _reusable(cfg, path.name, definition)
                cells.append({"arm": arm, "es": es, "path": path, "definition": definition, "reuse": reuse,
                              "rejudge": rejudge})
        plan.append({"method": m, "seed": s, "setting": st, "cells": cells})
    return plan


def describe_plan(plan: list[dict], out: Path) -> dict:
    """--dry-run: per model to build, its cells' state and, for a checkpointed training of this job
    in ``out/_train``, how far it got (the step of its last checkpoint, the seconds trained up to it)
    or that it finished training (``final/``, its evaluation pending). Reads, never writes."""
    jobs, lines = [], []
    for job in plan:
        cells = job["cells"]
        if not cells:
            continue
        st = job["setting"]
        done = sum(c["path"].exists() for c in cells)
        reuse = sum(c["reuse"] is not None for c in cells)
        row = {"method": job["method"], "seed": job["seed"], "lr": st["lr"] if st else None,
               "clip": f"{st['clip_min']:g}:{st['clip_max']:g}" if st and uses_clip(job["method"]) else None,
               "cells_done": done, "cells_reusable": reuse, "cells_todo": len(cells) - done - reuse}
        if st is not None and row["cells_todo"]:
            tdir = out / "_train" / _train_dir_name(job["method"], job["seed"], st)
            try:
                state = json.loads((tdir / JOB_FILE).read_text())
            except (OSError, ValueError):
                state = {}
            if isinstance(state, dict) and state.get("job") == digest(cells[0]["definition"]["train"]):
                if (tdir / FINAL / FINAL_INFO).is_file():
                    row["training"] = "finished (evaluation pending)"
                elif state.get("train_s"):
                    step = max(state["train_s"], key=int)
                    row["training"] = f"checkpoint at step {step}, {state['train_s'][step]:.0f} s trained"
        jobs.append(row)
        what = " ".join(x for x in (row["method"], f"seed {row['seed']}",
                                    f"lr {row['lr']:g}" if row["lr"] is not None else "",
                                    f"clip {row['clip']}" if row["clip"] else "") if x)
        status = "done" if not row["cells_todo"] and not reuse else \
            f"{done} done, {reuse} reusable, {row['cells_todo']} to do" + \
            (f"; {row['training']}" if row.get("training") else "")
        lines.append(f"{what}: {status}")
    todo = [j for j in jobs if j["cells_todo"]]
    return {"output_dir": str(out), "models": len(jobs), "models_to_build": len(todo),
            "cells_todo": sum(j["cells_todo"] for j in jobs), "plan": lines, "jobs": jobs}


def _generate(model, tok, recs, es: dict, cfg: CompareConfig, arm: str, seed: int,
              options: DecodingOptions | None = None) -> tuple[list[str], dict, list]:
    """Predictions for one eval set, the prompt-length counters (profile cut / removed) and, per
    record, whether generation ended at an end token (degeneration). ``options``: other decoding
    than the arm's (repetition's second decoding, with the n-gram ban off)."""
    from ..encoding import EncodeStats
    from ..generation import generate_for

    stats, info = EncodeStats(), []
    texts = generate_for(model, tok, recs, es["task"], cfg, options or arm_decoding(cfg, arm),
                         use_profile=uses_profile(arm), seed=seed, progress=cfg.progress, stats=stats, info=info)
    return texts, stats.counts(), info


def _shown_items(tok, recs, es: dict, cfg: CompareConfig) -> list[list[dict]]:
    """Per record, the profile items as they stand in its generation prompt (after retrieval and the
    length cut): what a generation could copy, and what copy_retrieved predicts."""
    builder = cfg.prompt_builder(tok, es["task"], reserve_tokens=cfg.max_new_tokens)
    return [builder.encode(r, with_response=False)["profile_items_shown"] for r in recs]


def _item_text(item: dict, es: dict) -> str:
    """A shown item's text as a generation could copy it: its text field (the task's rendering when the
    task has none)."""
    from ..prompts import get_task

    task = get_task(es["task"])
    return str(item.get(task.text_field, "")) if task.text_field else task.render_item(item)


def _copy_retrieved(tok, shown: list[list[dict]], es: dict, cfg: CompareConfig) -> tuple[list[str], list]:
    """copy_retrieved's predictions: the first shown item's text, cut to max_new_tokens tokens (a
    generation could not be longer), and per record whether it ended before the cap."""
    from ..copying import retrieved_item_baseline
    from ..prompts import get_task

    field = get_task(es["task"]).text_field or "text"
    texts, info = [], []
    for items in shown:
        ids = tok(retrieved_item_baseline(items, field), add_special_tokens=False)["input_ids"]
        texts.append(tok.decode(ids[: cfg.max_new_tokens], skip_special_tokens=True).strip())
        info.append({"new_tokens": min(len(ids), cfg.max_new_tokens), "ended": len(ids) <= cfg.max_new_tokens})
    return texts, info


def _shares_prefill(model, cfg: CompareConfig, arm: str) -> bool:
    """A cell whose generation and likelihood can come from one prefill per prompt: greedy decoding
    from the with-profile prompt (the prompt the likelihood pass scores the gold after)."""
    from ..generation import shares_prefill
    return uses_profile(arm) and shares_prefill(model, arm_decoding(cfg, arm))


def _generate_and_score(model, tok, recs, es: dict, cfg: CompareConfig, arm: str) -> tuple[list[str], dict, list, list]:
    """``_generate`` and ``_likelihood_rows`` of one cell in one pass (``score.generate_and_score_records``):
    the same prompts, predictions and rows, each prompt prefilled once instead of twice."""
    from ..encoding import EncodeStats
    from .score import generate_and_score_records

    builder = cfg.prompt_builder(tok, es["task"])
    builder.stats = EncodeStats()
    info: list = []
    options = arm_decoding(cfg, arm)
    texts, rows = generate_and_score_records(model, tok, recs, builder, options, batch_size=options.batch_size,
                                             progress=cfg.progress, info=info)
    builder.stats.warn()
    return texts, builder.stats.counts(), info, rows


def _likelihood_rows(model, tok, recs, es: dict, cfg: CompareConfig) -> list[dict]:
    """Per-token log-probs and PIR of the gold responses (``percontrast score``'s rows)."""
    from .score import score_records

    return score_records(model, tok, recs, cfg.prompt_builder(tok, es["task"]), batch_size=cfg.batch_size,
                         progress=False)


def personal_tokens(cfg: CompareConfig, eval_sets: list[dict], eval_records: dict, digests: dict, out: Path) -> dict:
    """Per eval set: the personal-token positions fixed by the untrained model (``likelihood.py``),
    cached in ``personal_tokens__<eval set>.json`` under the hash of what decides them."""
    from .. import likelihood

    threshold = likelihood.PERSONAL_PIR
    result, model = {}, None
    for es in eval_sets:
        shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelDataOptions)
                  if f.name not in _NOT_DEFINING_SHARED}
        key = digest({"shared": shared, "task": es["task"], "records_sha256": digests[es["name"]],
                      "threshold": threshold})
        path = out / f"personal_tokens__{es['name']}.json"
        if path.exists():
            try:
                cached = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                cached = {}
            if cached.get("config_hash") == key:
                result[es["name"]] = cached["examples"]
                continue
        if model is None:
            model, tok = load_base(cfg)
        rows = _likelihood_rows(model, tok, eval_records[es["name"]], es, cfg)
        result[es["name"]] = likelihood.personal_positions(rows, threshold)
        write_text_atomic(path, json.dumps({"config_hash": key, "examples": result[es["name"]]}))
    return result


def _rejudge(c: dict, cfg: CompareConfig, judge, recs: list[dict]) -> None:
    """A finished cell whose only change is the judge: re-score its stored predictions and rewrite it."""
    from ..judge import judge_into
    from ..prompts import get_task

    cell = json.loads(c["path"].read_text())
    by_id = {str(e["id"]): e for e in cell["examples"]}
    rows = [by_id[str(r["id"])] for r in recs]   # same records: the definition's digest matched
    per = [e["scores"] for e in rows]
    for p in per:
        p.pop("judge", None), p.pop("judge_mass", None)
    cell["metrics"].pop("judge", None), cell["metrics"].pop("judge_mass", None)
    cell.pop("judge", None)
    if judge is not None:
        cell["judge"] = judge_into(judge, get_task(c["es"]["task"]), recs, [e["prediction"] or "" for e in rows],
                                   cfg, per, cell["metrics"])
    cell["config_hash"], cell["definition"] = digest(c["definition"]), c["definition"]
    write_text_atomic(c["path"], json.dumps(cell, indent=1, default=str))


def _measure(cfg: CompareConfig, arm: str, recs: list[dict], texts: list[str] | None, info: list | None,
             like_rows: list[dict] | None, personal: dict | None, attributor, noban: tuple | None = None,
             copy: dict | None = None, specific: dict | None = None) -> tuple[list[dict], dict]:
    """Per-example scores and corpus values of one cell: overlap metrics, likelihood, attribution,
    degeneration, and with ``noban`` (texts, info of the ban-off decoding) repetition, with ``copy``
    ({"shown": per record the shown item texts, "loo": the leave-shown-out attributor}) copying
    (whichever the config asks for; the judge comes after, ``judge.judge_into``); ``specific``: the
    user-specific token positions (``specificity.specific_positions``) for nll_specific."""
    from ..degeneration import degeneration_flags, distinct_n
    from ..likelihood import example_likelihood, summarize_likelihood
    from .evaluate import score

    n = len(recs)
    per, corpus = (score(texts, recs, cfg.metrics) if cfg.generate else ([{} for _ in recs], {}))
    if like_rows is not None:
        ex = [example_likelihood(row, personal[row["id"]], None if specific is None else specific[row["id"]])
              for row in like_rows]
        keys = ("nll", "nll_personal", "nll_other", "mean_pir") + \
            (("nll_specific", "nll_nonspecific") if specific is not None else ())
        for p, e in zip(per, ex):
            p.update({k: e[k] for k in keys})
        corpus.update({k: v for k, v in summarize_likelihood(ex).items()})
    if cfg.generate:
        flags = [degeneration_flags(t, inf["ended"]) for t, inf in zip(texts, info)]
        for p, f in zip(per, flags):
            p["hit_cap"], p["loop"] = float(f["hit_cap"]), float(f["loop"])
        corpus["hit_cap"] = sum(p["hit_cap"] for p in per) / n
        corpus["loop"] = sum(p["loop"] for p in per) / n
    if noban is not None:
        nb_texts, nb_info = noban
        nb = [degeneration_flags(t, inf["ended"]) for t, inf in zip(nb_texts, nb_info)]
        for p, f, g in zip(per, flags, nb):
            p["seq_rep_4"] = f["seq_rep_4"]
            p["noban_seq_rep_4"], p["noban_loop"], p["noban_hit_cap"] = g["seq_rep_4"], float(g["loop"]), \
                float(g["hit_cap"])
        for key in ("seq_rep_4", "noban_seq_rep_4", "noban_loop", "noban_hit_cap"):
            corpus[key] = sum(p[key] for p in per) / n
        corpus["distinct_2"], corpus["noban_distinct_2"] = distinct_n(texts, 2), distinct_n(nb_texts, 2)
    users = [r["user_id"] for r in recs]
    if attributor is not None:
        from ..attribution import attribution_share
        att = attribution_share(attributor, texts, users)
        for p, a in zip(per, att["correct"]):
            p["attributed"] = float(a)
        corpus["attributed"] = att["share"]
        if copy is not None:
            corpus["attributed_macro"] = att["share_macro"]
    if copy is not None:
        from ..copying import copy_rate, longest_copied_span
        for p, t, src in zip(per, texts, copy["shown"]):
            p["copy_rate"], p["copy_span"] = copy_rate(t, src), float(longest_copied_span(t, src))
        corpus["copy_rate"] = sum(p["copy_rate"] for p in per) / n
        corpus["copy_span"] = sum(p["copy_span"] for p in per) / n
        from ..attribution import attribution_share
        loo = attribution_share(copy["loo"], texts, users)
        for p, a in zip(per, loo["correct"]):
            p["attributed_loo"] = float(a)
        corpus["attributed_loo"], corpus["attributed_loo_macro"] = loo["share"], loo["share_macro"]
    return per, corpus


def run(cfg: CompareConfig) -> dict:
    import torch

    from ..datasets import load_records
    from ..judge import judge_into
    from ..metrics import metric_versions
    from ..models import default_device
    from ..prompts import get_task
    from ..runinfo import run_info

    out = Path(cfg.output_dir)
    # Everything that can fail on the user's input fails here, before any training.
    train_records = load_records(cfg.data, get_task(cfg.task), limit=cfg.limit) \
        if any(train_method(m) in TRAINED_METHODS for m in cfg.methods) else []
    eval_sets = cfg.eval_sets_resolved()
    eval_records = {es["name"]: load_records(es["data"], get_task(es["task"]), limit=es["limit"])
                    for es in eval_sets}
    settings = cfg.settings()
    for s in settings:
        for m in cfg.methods:
            if train_method(m) in TRAINED_METHODS:
                cfg.train_config(model_method(m), cfg.seeds[0], s["lr"], (s["clip_min"], s["clip_max"]))
    if REFERENCE not in cfg.methods:
        raise UserError(f"methods must include {REFERENCE!r}: every difference is taken against it")
    # The base model is deterministic under greedy decoding: one seed is enough.
    base_seeds = cfg.seeds if cfg.do_sample else cfg.seeds[:1]
    digests = record_digests(train_records, eval_records)
    judge_desc = cfg.judge_description()   # names only: a server is asked for its model, nothing loads
    plan = _plan(cfg, _jobs(cfg, settings, base_seeds), eval_sets, digests, out, judge_desc)
    if cfg.dry_run:
        return describe_plan(plan, out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for c in (c for job in plan for c in job["cells"] if c["reuse"] is not None):
        write_text_atomic(c["path"], c["reuse"].read_text())   # same settings hash: the same cell
    write_text_atomic(out / "compare_config.json", json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
    device = default_device()
    todo_any = not cfg.summarize_only and any(not c["path"].exists() for job in plan for c in job["cells"])
    personal = personal_tokens(cfg, eval_sets, eval_records, digests, out) if cfg.likelihood and todo_any else None
    attributors = {}
    if cfg.attribution and todo_any:
        from ..attribution import fit_attributor
        attributors = {es["name"]: fit_attributor(eval_records[es["name"]], seed=0) for es in eval_sets}
    rejudge = [c for job in plan for c in job["cells"] if c["rejudge"]]
    # loaded (or reached and checked) once, before any training, and only when it has work
    judge = cfg.make_judge(cfg.trust_remote_code) if judge_desc and (todo_any or rejudge) else None
    for c in rejudge:
        _rejudge(c, cfg, judge, eval_records[c["es"]["name"]])

    shown: dict[str, list] = {}            # eval set -> per record, the profile items shown in its prompt
    loo_attributors: dict[str, object] = {}
    specific: dict[str, dict] = {}         # eval set -> user-specific token positions (specific_tokens)
    done = skipped = 0
    for job in plan if not cfg.summarize_only else []:
        m, s, st = job["method"], job["seed"], job["setting"]
        todo = [c for c in job["cells"] if not c["path"].exists()]
        skipped += len(job["cells"]) - len(todo)
        if not todo:
            continue
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            if st is not None:
                tdir = out / "_train" / _train_dir_name(m, s, st)
                tcfg = cfg.train_config(m, s, st["lr"], (st["clip_min"], st["clip_max"]), output_dir=str(tdir))
                if tcfg.save_steps > 0:   # resumable mid-training: the folder must be this job's
                    claim_train_dir(tdir, digest(job["cells"][0]["definition"]["train"]))
                model, tok, info = train_model(tcfg, train_records)
            else:
                model, tok = load_base(cfg)
                info = {"steps": 0, "train_s": 0.0}
            model.to(device)
        train_s = time.perf_counter() - t0
        like_rows: dict[str, list] = {}   # X and X+contrast share the model, so its likelihood too
        for c in todo:
            es, arm = c["es"], c["arm"]
            recs = eval_records[es["name"]]
            if (cfg.copy_control or arm == COPY_BASELINE) and es["name"] not in shown:
                shown[es["name"]] = _shown_items(tok, recs, es, cfg)
            t1 = time.perf_counter()
            texts, prompt_stats, gen_info, noban = None, None, None, None
            with PeakMemory() as emem:
                if arm == COPY_BASELINE:   # no generation; its likelihood columns are the untrained model's
                    texts, gen_info = _copy_retrieved(tok, shown[es["name"]], es, cfg)
                elif cfg.generate and cfg.likelihood and es["name"] not in like_rows and \
                        _shares_prefill(model, cfg, arm):
                    texts, prompt_stats, gen_info, like_rows[es["name"]] = _generate_and_score(
                        model, tok, recs, es, cfg, arm)
                elif cfg.generate:
                    texts, prompt_stats, gen_info = _generate(model, tok, recs, es, cfg, arm, s)
                if cfg.repetition:
                    opts = arm_decoding(cfg, arm)
                    noban = (texts, gen_info)   # no ban to lift (or a copy): the same generations
                    if opts.no_repeat_ngram_size and arm != COPY_BASELINE:
                        nb_texts, _, nb_info = _generate(model, tok, recs, es, cfg, arm, s,
                                                         dataclasses.replace(opts, no_repeat_ngram_size=0))
                        noban = (nb_texts, nb_info)
                if cfg.likelihood and es["name"] not in like_rows:
                    like_rows[es["name"]] = _likelihood_rows(model, tok, recs, es, cfg)
            eval_s = time.perf_counter() - t1
            copy = None
            if cfg.copy_control:
                sources = [[_item_text(it, es) for it in items] for items in shown[es["name"]]]
                if es["name"] not in loo_attributors:   # fitted once per eval set, on first use
                    from ..attribution import fit_leave_shown_out
                    loo_attributors[es["name"]] = fit_leave_shown_out(recs, shown[es["name"]], seed=0)
                copy = {"shown": sources, "loo": loo_attributors[es["name"]]}
            if cfg.specific_tokens and es["name"] not in specific:   # the same tokens for every model
                from ..specificity import specific_positions
                specific[es["name"]] = specific_positions(like_rows[es["name"]], recs)
            per, corpus = _measure(cfg, arm, recs, texts, gen_info, like_rows.get(es["name"]),
                                   personal[es["name"]] if personal else None, attributors.get(es["name"]),
                                   noban, copy, specific.get(es["name"]))
            judged = {"judge": judge_into(judge, get_task(es["task"]), recs, texts, cfg, per, corpus)} \
                if judge is not None else {}
            cell = {"method": arm, "seed": s, "eval_set": es["name"], "trained": st is not None,
                    "lr": st["lr"] if st else None,
                    "clip_min": st["clip_min"] if st and uses_clip(m) else None,
                    "clip_max": st["clip_max"] if st and uses_clip(m) else None,
                    "config_hash": digest(c["definition"]), "definition": c["definition"],
                    "metrics": corpus, "prompt_stats": prompt_stats, "train": info, "train_s": round(train_s, 2),
                    "eval_s": round(eval_s, 2), "peak_mem_bytes": max(mem.peak, emem.peak), "mem_kind": mem.kind,
                    "examples": [{"id": r["id"], "prediction": texts[i] if texts else None, "scores": per[i],
                                  **({"new_tokens": gen_info[i]["new_tokens"]} if gen_info else {})}
                                 for i, r in enumerate(recs)], **judged,
                    # a study's cells come from many sessions and machines: each says which ran it
                    "run": run_info()}
            write_text_atomic(c["path"], json.dumps(cell, indent=1, default=str))
            done += 1
        if st is not None and tcfg.save_steps > 0:   # every cell of the job is written: its checkpoints go
            import shutil
            shutil.rmtree(tdir, ignore_errors=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # Re-read and re-check every finished cell: parallel processes may have added some.
    cells = [read_cell(c["path"], c["definition"], cfg) for job in plan for c in job["cells"] if c["path"].exists()]
    results = summarize(cfg, cells, eval_sets, settings, base_seeds)
    if cfg.attribution:
        from ..attribution import fit_attributor, gold_ceiling
        results["attribution"] = {}
        for es in eval_sets:   # chance and the gold responses' own share (the ceiling) beside the arms
            att = attributors.get(es["name"]) or fit_attributor(eval_records[es["name"]], seed=0)
            gold = gold_ceiling(att, eval_records[es["name"]])
            results["attribution"][es["name"]] = {"n_users": len(set(r["user_id"] for r in eval_records[es["name"]])),
                                                 "chance": gold["chance"], "majority": gold["chance_majority"],
                                                 "uniform": gold["chance_uniform"], "ceiling": gold["share"]}
    if specific and personal:   # how the two personal-token definitions overlap (model-independent)
        from ..specificity import overlap
        results["token_sets"] = {name: overlap(personal[name], pos) for name, pos in specific.items()}
    if cfg.copy_control:
        from ..attribution import gold_ceiling
        results["attribution_loo"] = {}
        for es in eval_sets:   # the users' own text under the classifier that never saw the shown items
            loo = loo_attributors.get(es["name"])
            if loo is None:    # every cell was finished before: fit it for the ceiling
                from ..attribution import fit_leave_shown_out
                loo = fit_leave_shown_out(eval_records[es["name"]], _shown_items(
                    load_base(cfg)[1], eval_records[es["name"]], es, cfg), seed=0)
            gold = gold_ceiling(loo, eval_records[es["name"]])
            results["attribution_loo"][es["name"]] = {"ceiling": gold["share"], "ceiling_macro": gold["share_macro"],
                                                      "chance_macro": gold["chance_macro"],
                                                      "classifiers": loo.n_classifiers}
    if judge_desc is not None:
        from ..judge import note_for
        results["judge"] = {**judge_desc, "note": note_for(judge_desc["judge"], judge_desc.get("model")),
                            "unscored": sum((c.get("judge") or {}).get("unscored", 0) for c in cells)}
    results["metric_versions"] = metric_versions()
    results["run"] = run_info(cfg)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=str))
    write_text_atomic(out / "results.md", render_markdown(results))
    plot(results, out / "results.png")
    if results["curves"]:
        plot_curves(results["curves"], out / "curves.png", f"{cfg.model} / {cfg.task}: learning curves")
    return {"cells_computed": done, "cells_skipped": skipped, "output_dir": str(out),
            "table": str(out / "results.md")}
