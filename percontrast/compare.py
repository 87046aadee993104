"""``percontrast compare``: train and evaluate every method x seed from one YAML file.

    percontrast compare --config configs/compare/sample.yaml

Methods: ``base_profile`` / ``base_noprofile`` (the model as loaded, with / without the
profile in the prompt), ``ce``, ``lossce``, ``entce``, ``perce``. Every trained method
gets the same training data, the same ``train:`` settings (TrainConfig fields: budget,
LoRA or full, batch size, ...) and the same decoding; only ``method`` changes. Optional
grids: ``learning_rates`` and ``clips`` ("m:M") for the learning-rate / clip robustness
study, and several ``eval_sets`` (cross-task transfer: train on one task's data,
evaluate on each).

Output (``output_dir``): ``cells/<key>.json`` per finished (method, seed, lr, clip, eval
set), written atomically and reused on a rerun (resume) only when the hash of everything
that defines the cell (settings, model, data content, decoding, prompt) still matches;
``results.json`` and ``results.md`` (per method: mean over seeds with a 95% t-interval;
against ``ce``, on the seeds both have, paired by seed and example: the mean difference
with a bootstrap interval over examples and one over seeds then examples, and the
relative gain in %; wall time, peak memory) and ``results.png``. Everything is checked
(methods, metrics, data files, train settings, stale cells) before the first training step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .config import field
from .errors import UserError
from .evaluate import check_metrics
from .generate import DecodingFields
from .metrics import DEFAULT_METRICS
from .options import ModelDataOptions

BASE_METHODS = ("base_profile", "base_noprofile")
TRAINED_METHODS = ("ce", "lossce", "entce", "perce")
ALL_METHODS = BASE_METHODS + TRAINED_METHODS
REFERENCE = "ce"
# TrainConfig fields that compare owns (set per cell or shared from the top level)
_OWNED = {"method", "seed", "learning_rate", "clip_min", "clip_max", "output_dir", "resume", "overwrite",
          "model", "data", "task", "k", "retriever", "max_length", "limit", "dtype", "trust_remote_code"}


@dataclass
class CompareConfig(ModelDataOptions, DecodingFields):
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS),
                               help="Methods to compare: " + ", ".join(ALL_METHODS) + ".")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], help="Training seeds.")
    test_data: str = field("", help="Test records (evaluated as eval set 'test'); or give eval_sets in YAML.")
    test_limit: int | None = field(None, help="Use only the first N test records (a capped test set).")
    eval_sets: list[dict] = field(default_factory=list, help="YAML: list of {name, data, task (default: the "
                                  "training task), limit} to evaluate every trained model on (cross-task).")
    train: dict = field(default_factory=dict, help="YAML: TrainConfig fields shared by all trained methods "
                        "(max_steps, epochs, lora, batch_size, learning_rate, ...).")
    learning_rates: list[float] = field(default_factory=list, help="Learning-rate grid (empty: train.learning_rate).")
    clips: list[str] = field(default_factory=list, help="Clip grid as m:M (e.g. 0.8:5 0.5:5); empty: train's "
                             "clip_min/clip_max. Applies to perce/lossce/entce; ce ignores it.")
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS), help="Metrics to report.")
    bootstrap_resamples: int = field(10000, help="Resamples of each bootstrap interval of the difference to ce "
                                     "(examples only; seeds then examples), RNG seed 0.")
    output_dir: str = field("out/compare", help="Cells, results.md/json and results.png go here.")
    progress: bool = field(True, help="Show progress bars.")
    summarize_only: bool = field(False, help="Only rebuild results.md/json/png from the finished cells; "
                                 "train and evaluate nothing (e.g. after a time-boxed run).")
    adopt_unhashed_cells: bool = field(False, help="Reuse cells written before cells carried a settings hash, "
                                       "taking your word that they were made with this config (they are "
                                       "listed in results.json/md). Without it such cells are refused.")

    def __post_init__(self):
        super().__post_init__()
        self.check_decoding()
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad or not self.methods:
            raise UserError(f"unknown method {', '.join(map(repr, bad)) or '(none given)'}; "
                            f"known: {', '.join(ALL_METHODS)}")
        self.methods = list(dict.fromkeys(self.methods))
        self.metrics = check_metrics(self.metrics)
        if not self.seeds:
            raise UserError("seeds: give at least one seed")
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
        self.train_config(REFERENCE, self.seeds[0])  # validates the train: block now (unknown keys, values)

    # -- derived -------------------------------------------------------------------
    def eval_sets_resolved(self) -> list[dict]:
        sets = [{"name": "test", "data": self.test_data, "task": self.task, "limit": self.test_limit}] \
            if self.test_data else []
        for es in self.eval_sets:
            name = es.get("name") or Path(str(es["data"])).stem
            sets.append({"name": str(name), "data": str(es["data"]), "task": es.get("task", self.task),
                         "limit": es.get("limit")})
        return sets

    def settings(self) -> list[dict]:
        """The (learning rate, clip) grid; each point is a separate set of trained models."""
        base = self.train_config(REFERENCE, self.seeds[0])
        lrs = self.learning_rates or [base.learning_rate]
        clips = [parse_clip(c) for c in self.clips] or [(base.clip_min, base.clip_max)]
        return [{"lr": lr, "clip_min": m, "clip_max": M} for lr in lrs for (m, M) in clips]

    def train_config(self, method: str, seed: int, lr: float | None = None, clip: tuple | None = None,
                     output_dir: str = "out/compare/_train"):
        from . import config as cfgmod
        from .train import TrainConfig

        owned = sorted(set(self.train) & _OWNED - {"learning_rate", "clip_min", "clip_max"})
        if owned:
            raise UserError(f"train: keys {owned} are set by compare itself (top level / per cell)")
        values = dict(self.train)
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelDataOptions)}
        values.update(shared, method=method, seed=seed, output_dir=output_dir, overwrite=True, progress=False)
        if lr is not None:
            values["learning_rate"] = lr
        if clip is not None:
            values["clip_min"], values["clip_max"] = clip
        return cfgmod.build(TrainConfig, values, source="compare config: train")


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

def cell_key(method: str, seed: int, setting: dict, eval_name: str, trained: bool) -> str:
    if not trained:  # the base model does not depend on lr / clip
        return f"{method}__seed{seed}__{eval_name}"
    clip = f"__clip{setting['clip_min']:g}-{setting['clip_max']:g}" if _uses_clip(method) else ""
    return f"{method}__seed{seed}__lr{setting['lr']:g}{clip}__{eval_name}"


def _uses_clip(method: str) -> bool:
    return method in ("perce", "lossce", "entce")


# What a cell's hash leaves out, and why: where files go and how chatty the run is do not
# change a trained model or its outputs; data/limit are replaced by the content digest of
# the records actually used (moving the data folder must not invalidate cells, editing it
# must); no_profile is not read by compare (the method decides the prompt).
_NOT_DEFINING_TRAIN = {"output_dir", "resume", "overwrite", "progress", "logging_steps", "save_steps",
                       "save_total_limit"}
_NOT_DEFINING_SHARED = {"data", "limit", "trust_remote_code"}
_NOT_DEFINING_DECODING = {"no_profile"}
_CLIP_FIELDS = {"clip_min", "clip_max", "allow_negative_clip"}
TRAIN_RECORDS = "__train__"  # key of the training records in the digests


def digest(obj) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): equal content, equal digest."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cell_definition(cfg: CompareConfig, method: str, seed: int, setting: dict | None, es: dict,
                    digests: dict[str, str]) -> dict:
    """Everything that decides a cell's predictions; its digest is the cell's ``config_hash``.

    ``setting`` is None for an untrained method. Trained methods carry the full resolved
    TrainConfig (defaults included, so a changed default also counts as a change)."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelDataOptions)
              if f.name not in _NOT_DEFINING_SHARED}
    decoding = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DecodingFields)
                if f.name not in _NOT_DEFINING_DECODING}
    d = {"method": method, "seed": seed, "shared": shared, "decoding": decoding,
         "eval_set": {"name": es["name"], "task": es["task"], "records_sha256": digests[es["name"]]},
         "train": None}
    if setting is not None:
        tcfg = cfg.train_config(method, seed, setting["lr"], (setting["clip_min"], setting["clip_max"]))
        skip = _NOT_DEFINING_TRAIN | set(shared) | _NOT_DEFINING_SHARED | (set() if _uses_clip(method)
                                                                           else _CLIP_FIELDS)
        d["train"] = {"records_sha256": digests[TRAIN_RECORDS],
                      "config": {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in skip}}
    return d


def _changed_paths(a, b, prefix: str = "") -> list[str]:
    """Dotted paths where two definitions differ (for the refusal message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _changed_paths(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def read_cell(path: Path, definition: dict, cfg: CompareConfig) -> dict:
    """A finished cell, checked against the cell the current config would compute.

    Reusing a cell made with other settings would mix two experiments in one table, so
    any mismatch is one UserError naming the file and the way out."""
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
        shown = ", ".join(changed[:4]) + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "") \
            if changed else "not recorded"
        raise UserError(f"{path}: cell was computed with other settings than this config (changed: {shown}); "
                        "delete it to recompute it, or use a new output_dir to keep both")
    missing = [m for m in cfg.metrics if m not in cell.get("metrics", {})]
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


def train_model(tcfg, records: list[dict]):
    """Train one model (a fresh copy of the base model) with ``build_trainer``; return
    (model, tokenizer, info). Tests monkeypatch this to count training calls."""
    import transformers

    from .models import load_model
    from .train import build_trainer

    transformers.set_seed(tcfg.seed)
    model, tok = load_model(tcfg.model, dtype=tcfg.dtype, trust_remote_code=tcfg.trust_remote_code)
    trainer, builder = build_trainer(tcfg, model, tok, records, callbacks=[_NoSave()])
    t0 = time.perf_counter()
    result = trainer.train()
    info = {"steps": trainer.state.global_step, "train_loss": result.training_loss,
            "train_s": round(time.perf_counter() - t0, 2), "response_cut": builder.stats.response_cut,
            "log": [h for h in trainer.state.log_history if "loss" in h][-50:]}
    model = trainer.model
    model.eval()
    return model, tok, info


def load_base(cfg: CompareConfig):
    from .models import load_model
    return load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)


def _write_json(path: Path, obj) -> None:
    from .data import write_text_atomic
    write_text_atomic(path, json.dumps(obj, indent=1, default=str))


# ---------------------------------------------------------------- run

def _jobs(cfg: CompareConfig, settings: list[dict], base_seeds: list[int]) -> list[tuple]:
    """(method, seed, setting or None) per model to build, seed-major: every method for the
    first seed, then the next seed ..., so an interrupted or time-boxed run still has
    complete method comparisons for the seeds done."""
    jobs = [(m, base_seeds[0], None) for m in cfg.methods if m in BASE_METHODS]
    for i, s in enumerate(cfg.seeds):
        if i > 0:
            jobs += [(m, s, None) for m in cfg.methods if m in BASE_METHODS and s in base_seeds]
        for st_i, st in enumerate(settings):
            for m in cfg.methods:
                if m in BASE_METHODS:
                    continue
                # ce ignores the clip: train it once per learning rate
                if not _uses_clip(m) and any(x["lr"] == st["lr"] for x in settings[:st_i]):
                    continue
                jobs.append((m, s, st))
    return jobs


def _plan(cfg, jobs, eval_sets, digests, out: Path) -> list[dict]:
    """Per job: its cells (eval set, file, definition) and which are already finished. Every
    finished cell is checked against the current config here, before any training."""
    plan = []
    for m, s, st in jobs:
        cells = []
        for es in eval_sets:
            path = out / "cells" / f"{cell_key(m, s, st or {}, es['name'], st is not None)}.json"
            definition = cell_definition(cfg, m, s, st, es, digests)
            if path.exists():
                read_cell(path, definition, cfg)
            cells.append({"es": es, "path": path, "definition": definition})
        plan.append({"method": m, "seed": s, "setting": st, "cells": cells})
    return plan


def _generate(model, tok, recs, es: dict, cfg: CompareConfig, method: str, seed: int) -> tuple[list[str], dict]:
    """Predictions for one eval set, and the prompt-length counters (profile cut / removed)."""
    from .encoding import EncodeStats
    from .evaluate import generate_for

    stats = EncodeStats()
    texts = generate_for(model, tok, recs, es["task"], cfg, cfg, use_profile=(method != "base_noprofile"),
                         seed=seed, progress=cfg.progress, stats=stats)
    return texts, stats.counts()


def run(cfg: CompareConfig) -> dict:
    import torch

    from .data import load_records, write_text_atomic
    from .evaluate import score
    from .metrics import metric_versions
    from .models import default_device
    from .prompts import get_task
    from .runinfo import run_info

    out = Path(cfg.output_dir)
    # Everything that can fail on the user's input fails here, before any training.
    train_records = load_records(cfg.data, get_task(cfg.task), limit=cfg.limit) \
        if any(m in TRAINED_METHODS for m in cfg.methods) else []
    eval_sets = cfg.eval_sets_resolved()
    eval_records = {es["name"]: load_records(es["data"], get_task(es["task"]), limit=es["limit"])
                    for es in eval_sets}
    settings = cfg.settings()
    for s in settings:
        for m in cfg.methods:
            if m in TRAINED_METHODS:
                cfg.train_config(m, cfg.seeds[0], s["lr"], (s["clip_min"], s["clip_max"]))
    if REFERENCE not in cfg.methods:
        raise UserError(f"methods must include {REFERENCE!r}: every difference is taken against it")
    # The base model is deterministic under greedy decoding: one seed is enough.
    base_seeds = cfg.seeds if cfg.do_sample else cfg.seeds[:1]
    plan = _plan(cfg, _jobs(cfg, settings, base_seeds), eval_sets,
                 record_digests(train_records, eval_records), out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    _write_json(out / "compare_config.json", dataclasses.asdict(cfg))
    device = default_device()

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
                tcfg = cfg.train_config(m, s, st["lr"], (st["clip_min"], st["clip_max"]),
                                        output_dir=str(out / "_train" / f"{m}__seed{s}"))
                model, tok, info = train_model(tcfg, train_records)
            else:
                model, tok = load_base(cfg)
                info = {"steps": 0, "train_s": 0.0}
            model.to(device)
        train_s = time.perf_counter() - t0
        for c in todo:
            recs = eval_records[c["es"]["name"]]
            t1 = time.perf_counter()
            with PeakMemory() as emem:
                texts, prompt_stats = _generate(model, tok, recs, c["es"], cfg, m, s)
            eval_s = time.perf_counter() - t1
            per, corpus = score(texts, recs, cfg.metrics)
            cell = {"method": m, "seed": s, "eval_set": c["es"]["name"], "trained": st is not None,
                    "lr": st["lr"] if st else None,
                    "clip_min": st["clip_min"] if st and _uses_clip(m) else None,
                    "clip_max": st["clip_max"] if st and _uses_clip(m) else None,
                    "config_hash": digest(c["definition"]), "definition": c["definition"],
                    "metrics": corpus, "prompt_stats": prompt_stats, "train": info, "train_s": round(train_s, 2),
                    "eval_s": round(eval_s, 2), "peak_mem_bytes": max(mem.peak, emem.peak), "mem_kind": mem.kind,
                    "examples": [{"id": r["id"], "prediction": t, "scores": sc}
                                 for r, t, sc in zip(recs, texts, per)]}
            _write_json(c["path"], cell)
            done += 1
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # Re-read and re-check every finished cell: parallel processes may have added some.
    cells = [read_cell(c["path"], c["definition"], cfg) for job in plan for c in job["cells"] if c["path"].exists()]
    results = summarize(cfg, cells, eval_sets, settings, base_seeds)
    results["metric_versions"] = metric_versions()
    results["run"] = run_info(cfg)
    _write_json(out / "results.json", results)
    write_text_atomic(out / "results.md", render_markdown(results))
    plot(results, out / "results.png")
    return {"cells_computed": done, "cells_skipped": skipped, "output_dir": str(out),
            "table": str(out / "results.md")}


# ---------------------------------------------------------------- summary

def _cells_for(cells, method, eval_name, setting, seeds):
    """Cells of one method at one grid point (base methods ignore the grid; ce ignores the clip)."""
    sel = []
    for c in cells:
        if c["method"] != method or c["eval_set"] != eval_name or c["seed"] not in seeds:
            continue
        if c["trained"]:
            if not math.isclose(c["lr"], setting["lr"]):
                continue
            if _uses_clip(method) and not (math.isclose(c["clip_min"], setting["clip_min"])
                                           and math.isclose(c["clip_max"], setting["clip_max"])):
                continue
        sel.append(c)
    return sorted(sel, key=lambda c: c["seed"])


def pair_by_seed(cells: list[dict], ref_cells: list[dict], seed_independent: bool) -> tuple[list[dict], list[dict]]:
    """(method cells, reference cells), one pair per shared seed, in seed order.

    A seed-independent method (untrained, greedy: every seed would give the same output,
    which is why it is run once) stands for every reference seed. Otherwise only seeds
    both have count: averaging a 1-seed method against a 3-seed reference would compare
    one training run with the mean of three, mixing seed luck into the difference."""
    if seed_independent and cells:
        return [cells[0]] * len(ref_cells), list(ref_cells)
    by_seed = {c["seed"]: c for c in cells}
    ref = [r for r in ref_cells if r["seed"] in by_seed]
    return [by_seed[r["seed"]] for r in ref], ref


def score_table(cells: list[dict], metric: str, ids: list[str]) -> list[list[float]]:
    """Per-example scores [seeds][examples], examples in the order of ``ids`` (paired by id)."""
    rows = []
    for c in cells:
        by_id = {e["id"]: e["scores"][metric] for e in c["examples"]}
        if set(by_id) != set(ids):
            raise UserError(f"cell {c['method']} seed {c['seed']} ({c['eval_set']}) has other test ids than the "
                            f"{REFERENCE} cells; delete the stale cells and rerun")
        rows.append([by_id[i] for i in ids])
    return rows


def vs_reference(cells: list[dict], ref_cells: list[dict], metric: str, resamples: int) -> tuple[dict, float | None]:
    """Paired difference (method - reference) of ``metric`` over shared seeds x examples:
    mean, examples-only bootstrap (seed-averaged per-example scores; ``lo``/``hi``), and the
    two-level bootstrap over seeds then examples (``two_level``); plus the relative gain in %."""
    import numpy as np

    from .stats import paired_bootstrap, relative_gain, two_level_bootstrap

    ids = [e["id"] for e in ref_cells[0]["examples"]]
    a = np.asarray(score_table(cells, metric, ids))      # [S, I]
    b = np.asarray(score_table(ref_cells, metric, ids))  # [S, I]
    res = paired_bootstrap(a.mean(axis=0), b.mean(axis=0), n_resamples=resamples, seed=0)
    res["seeds"] = [c["seed"] for c in ref_cells]
    res["two_level"] = two_level_bootstrap(a - b, n_resamples=resamples, seed=0)
    return res, relative_gain(float(a.mean()), float(b.mean()))


def _prompt_counts(cells: list[dict]) -> dict:
    """Prompt-length counters of a method's cells (the same prompts for every seed); cells
    written before they were recorded give None."""
    stats = [c.get("prompt_stats") for c in cells]
    if any(st is None for st in stats):
        return {"profile_cut": None, "profile_removed": None}
    return {"profile_cut": max(st.get("profile_cut", 0) for st in stats),
            "profile_removed": max(st.get("profile_removed", 0) for st in stats)}


def _row(cfg: CompareConfig, m: str, mc: list[dict], ref_cells: list[dict]) -> dict:
    from .stats import t_interval

    det = m in BASE_METHODS and not cfg.do_sample
    row = {"method": m, "seeds": [c["seed"] for c in mc], "metrics": {}, "vs_ce": {}, "gain_pct": {},
           "shared_seeds": None, "train_s": sum(c["train_s"] for c in mc) / len(mc),
           "eval_s": sum(c["eval_s"] for c in mc) / len(mc),
           "peak_mem_mb": max(c["peak_mem_bytes"] for c in mc) / 2 ** 20, "mem_kind": mc[0]["mem_kind"],
           "deterministic": det, **_prompt_counts(mc)}
    for metric in cfg.metrics:
        d = t_interval([c["metrics"][metric] for c in mc]).as_dict()
        if det:  # greedy, untrained: every seed gives the same output
            d["lo"] = d["hi"] = d["mean"]
        row["metrics"][metric] = d
    if m == REFERENCE or not ref_cells:
        return row
    pm, pr = pair_by_seed(mc, ref_cells, det)
    row["shared_seeds"] = [c["seed"] for c in pr]
    for metric in cfg.metrics if pm else []:
        row["vs_ce"][metric], row["gain_pct"][metric] = vs_reference(pm, pr, metric, cfg.bootstrap_resamples)
    return row


def summarize(cfg: CompareConfig, cells: list[dict], eval_sets: list[dict], settings: list[dict],
              base_seeds: list[int]) -> dict:
    groups = []
    for es in eval_sets:
        for st in settings:
            ref_cells = _cells_for(cells, REFERENCE, es["name"], st, cfg.seeds)
            rows = []
            for m in cfg.methods:
                mc = _cells_for(cells, m, es["name"], st, base_seeds if m in BASE_METHODS else cfg.seeds)
                if mc:
                    rows.append(_row(cfg, m, mc, ref_cells))
            groups.append({"eval_set": es["name"], "task": es["task"], "data": es["data"],
                           "n_examples": len(ref_cells[0]["examples"]) if ref_cells else None, **st, "rows": rows})
    return {"model": cfg.model, "train_data": cfg.data, "task": cfg.task, "methods": cfg.methods, "seeds": cfg.seeds,
            "train": cfg.train, "decoding": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DecodingFields)},
            "prompt": {"k": cfg.k, "retriever": cfg.retriever, "max_length": cfg.max_length},
            "metrics": cfg.metrics, "bootstrap_resamples": cfg.bootstrap_resamples,
            "unhashed_cells": sorted(f"{c['method']}__seed{c['seed']}__{c['eval_set']}" for c in cells
                                     if c.get("unhashed")),
            "groups": groups}


_LABEL = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum",
          "meteor": "METEOR"}


def _fmt_iv(d: dict) -> str:
    if d["lo"] is None:
        return f"{100 * d['mean']:.2f}"
    return f"{100 * d['mean']:.2f} [{100 * d['lo']:.2f}, {100 * d['hi']:.2f}]"


def _fmt_delta(b: dict | None, shared: list | None) -> str:
    if shared == []:
        return "no shared seed"
    if b is None:
        return "—"
    text = f"{100 * b['diff']:+.2f} [{100 * b['lo']:+.2f}, {100 * b['hi']:+.2f}]"
    tl = b.get("two_level")  # absent in results written before it existed
    if tl is None:
        return text
    if not tl["seed_level"]:
        return text + " [n/a: 1 shared seed]"
    return text + f" [{100 * tl['lo']:+.2f}, {100 * tl['hi']:+.2f}]"


def _fmt_shared(r: dict) -> str:
    shared = r.get("shared_seeds")
    if r["method"] == REFERENCE or shared is None:
        return "—"
    return f"{len(shared)}{'*' if r['deterministic'] and shared else ''}"


_NOTES = ("Scores x100. Per method: mean over its seeds [95% t-interval over seeds]. "
          "Δ vs ce: mean paired difference over the seeds both methods have ('shared seeds'; pairs by seed "
          "and by test example); a method that shares no seed with ce is not compared ('no shared seed'). "
          "First bracket: 95% percentile bootstrap resampling test examples only (per-example differences "
          "averaged over the shared seeds; ignores seed variance). Second bracket: 95% two-level bootstrap "
          "resampling the shared seeds, then the test examples (seed and example variance); with one shared "
          "seed there is no seed level ('n/a: 1 shared seed'). {resamples} resamples each, RNG seed 0. "
          "Gain: relative difference against ce of the means over the shared seeds, in %. "
          "\\* untrained and greedy: evaluated once (the output is the same for every seed), and that run is "
          "paired with every ce seed.")


def _group_tables(res: dict, g: dict) -> list[str]:
    label = [_LABEL.get(m, m) for m in res["metrics"]]
    head = ["method", "seeds"] + label + ["train+load s", "eval s", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in g["rows"]:
        cells = [r["method"], str(len(r["seeds"]))] + [_fmt_iv(r["metrics"][m]) for m in res["metrics"]]
        cells += [f"{r['train_s']:.0f}", f"{r['eval_s']:.0f}", f"{r['peak_mem_mb']:.0f} ({r['mem_kind']})"]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["method", "shared seeds with ce"] + \
           [f"Δ{x} vs ce [CI: examples] [CI: seeds, then examples]" for x in label] + [f"gain {x} %" for x in label]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in g["rows"]:
        if r["method"] == REFERENCE:
            continue
        shared = r.get("shared_seeds")
        cells = [r["method"], _fmt_shared(r)] + [_fmt_delta(r["vs_ce"].get(m), shared) for m in res["metrics"]]
        cells += ["—" if r["gain_pct"].get(m) is None else f"{r['gain_pct'][m]:+.1f}" for m in res["metrics"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", _prompt_note(g)]


def _prompt_note(g: dict) -> str:
    """How many eval prompts the length limit cut the profile of, or removed it from entirely."""
    counts = {(r.get("profile_cut"), r.get("profile_removed")) for r in g["rows"]}
    n = g["n_examples"] or "?"
    if len(counts) == 1:
        cut, removed = counts.pop()
        if cut is None:
            return "Prompt length: not recorded in these cells."
        return (f"Prompt length: max_length cut the profile in {cut} of {n} eval prompts and removed it entirely "
                f"in {removed} (same for every method).")
    parts = [f"{r['method']} {r.get('profile_cut')}/{r.get('profile_removed')}" for r in g["rows"]]
    return f"Prompt length (profile cut / removed, of {n} eval prompts): " + ", ".join(parts) + "."


def render_markdown(res: dict) -> str:
    lines = [f"# compare: {res['model']} on {res['task']} ({res['train_data']})", "",
             _NOTES.format(resamples=res["bootstrap_resamples"]), ""]
    for g in res["groups"]:
        lines += [f"## eval set `{g['eval_set']}` ({g['task']}, {g['n_examples']} examples), "
                  f"lr {g['lr']:g}, clip [{g['clip_min']:g}, {g['clip_max']:g}]", ""]
        lines += _group_tables(res, g) + [""]
    if res.get("unhashed_cells"):
        lines += [f"Cells without a settings hash, reused on the user's word (--adopt-unhashed-cells): "
                  f"{', '.join(res['unhashed_cells'])}.", ""]
    run = res.get("run", {})
    lines += [f"Machine: {run.get('machine')}; date {run.get('date')}; git {run.get('git_commit')}.",
              f"Train settings: `{json.dumps(res['train'])}`; decoding: `{json.dumps(res['decoding'])}`; "
              f"prompt: `{json.dumps(res['prompt'])}`.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Bars with t-intervals per method (one grid point), or metric vs learning rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = res["metrics"]
    lrs = sorted({g["lr"] for g in res["groups"]})
    evals = list(dict.fromkeys(g["eval_set"] for g in res["groups"]))
    fig, axes = plt.subplots(len(evals), len(metrics), figsize=(4.2 * len(metrics), 3.4 * len(evals)),
                             squeeze=False)
    for i, ev in enumerate(evals):
        groups = [g for g in res["groups"] if g["eval_set"] == ev]
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            if len(lrs) > 1:  # learning-rate robustness: one line per method (and clip)
                series: dict[str, list] = {}
                for g in groups:
                    for r in g["rows"]:
                        label = r["method"] if r["method"] in ("ce",) + BASE_METHODS or len(
                            {(x["clip_min"], x["clip_max"]) for x in groups}) == 1 \
                            else f"{r['method']} [{g['clip_min']:g},{g['clip_max']:g}]"
                        series.setdefault(label, []).append((g["lr"], r["metrics"][metric]))
                for label, pts in series.items():
                    pts = sorted(set((lr, d["mean"], d["lo"], d["hi"]) for lr, d in pts))
                    xs = [p[0] for p in pts]
                    ys = [100 * p[1] for p in pts]
                    ax.plot(xs, ys, marker="o", label=label)
                    if all(p[2] is not None for p in pts):
                        ax.fill_between(xs, [100 * p[2] for p in pts], [100 * p[3] for p in pts], alpha=0.15)
                ax.set_xscale("log")
                ax.set_xlabel("learning rate")
            else:
                g = groups[0]
                names = [r["method"] for r in g["rows"]]
                means = [100 * r["metrics"][metric]["mean"] for r in g["rows"]]
                err = [[100 * (r["metrics"][metric]["mean"] - (r["metrics"][metric]["lo"] or r["metrics"][metric]["mean"]))
                        for r in g["rows"]],
                       [100 * ((r["metrics"][metric]["hi"] or r["metrics"][metric]["mean"]) - r["metrics"][metric]["mean"])
                        for r in g["rows"]]]
                ax.bar(range(len(names)), means, yerr=err, capsize=3,
                       color=["#d62728" if n == "perce" else "#1f77b4" if n == "ce" else "#999999" for n in names])
                ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_title(f"{ev}: {_LABEL.get(metric, metric)} (x100)")
            ax.grid(alpha=0.3)
        if len(lrs) > 1:
            axes[i][-1].legend(fontsize=7)
    fig.suptitle(f"{res['model']} / {res['task']}: mean over seeds, 95% t-interval", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    import os
    os.replace(tmp, path)
