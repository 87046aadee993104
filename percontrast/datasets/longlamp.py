"""Loaders for the public benchmarks, normalized to our record format.

LongLaMP (Kumar et al. 2024) as published on the Hugging Face hub (``LongLaMP/LongLaMP``,
six configurations ``{abstract_generation,product_review,topic_writing}_{user,temporal}``,
splits ``train``/``val``/``test``), read with ``datasets.load_dataset`` when the hub is
reachable, or from local files in the same layout: ``DIR/<config>/<split>.jsonl|.json|
.parquet`` (also ``DIR/<config>/<split>-00000-of-00001.parquet`` as the hub stores it, or
``DIR/<split>.*`` when DIR is one configuration's folder).

A published LongLaMP row is ``{<user field>, "input", "output", "profile": [...]}`` with
the user field ``name`` (abstracts), ``reviewerId`` (reviews) or ``author`` (topics), and
profile items ``{title, abstract, id, year}``, ``{overall, summary, description,
reviewText}`` and ``{summary, content, author, id}``. Rows carry no id of their own, so
ours is ``<config>-<split>-<row number>``. Profile items are kept exactly as published;
for topic writing we *add* ``input`` (= ``summary``) and ``output`` (= ``content``), the
names ``prompts.py`` reads (the benchmark's own prompt code reads ``summary``/``content``).

LaMP (Salemi et al. 2024): a questions file (a list of ``{id, input, profile}``) plus an
outputs file (``{"task": "LaMP_<k>", "golds": [{id, output}]}``) for the generation
tasks 4 (news headline; profile ``title``, ``text``), 5 (scholarly title; ``title``,
``abstract``) and 7 (tweet paraphrase; ``text``). Golds are joined by id; ids missing,
extra or duplicated on either side are one error that lists them.

Specs (``datasets.load_records`` passes them here): ``longlamp:<config>[:<split>][@<dir>]``
(split defaults to ``test``; ``@<dir>`` or ``$PERCONTRAST_LONGLAMP_DIR`` reads local
files instead of the hub) and ``lamp:<questions.json>[:<outputs.json>]`` (the outputs file
defaults to the questions file's name with ``questions`` replaced by ``outputs``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..data import read_jsonl
from ..errors import DataError, UserError
from ..hub import hub_host, hub_reachable, offline_mode

HUB_ID = "LongLaMP/LongLaMP"
LONGLAMP_TASKS = ("abstract_generation", "product_review", "topic_writing")
LONGLAMP_CONFIGS = tuple(f"{t}_{s}" for t in LONGLAMP_TASKS for s in ("user", "temporal"))
LONGLAMP_SPLITS = ("train", "val", "test")
USER_FIELD = {"abstract_generation": "name", "product_review": "reviewerId", "topic_writing": "author"}
# Profile item fields each task needs, as published. Values are (field, kinds) where
# kinds are the accepted JSON types ("str", or "num" for str-or-number).
PROFILE_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "abstract_generation": (("title", "str"), ("abstract", "str")),
    "product_review": (("overall", "num"), ("summary", "str"), ("description", "str"), ("reviewText", "str")),
    "topic_writing": (("summary", "str"), ("content", "str")),
    "news_headline": (("title", "str"), ("text", "str")),
    "scholarly_title": (("title", "str"), ("abstract", "str")),
    "tweet_paraphrase": (("text", "str"),),
}
LAMP_TASKS = {4: "news_headline", 5: "scholarly_title", 7: "tweet_paraphrase"}
ENV_DIR = "PERCONTRAST_LONGLAMP_DIR"
_LOCAL_HELP = (f"download the files where the hub is reachable and pass the folder: --source DIR for "
               f"'percontrast data prepare', or the spec longlamp:CONFIG:SPLIT@DIR (or set ${ENV_DIR}); "
               f"DIR holds CONFIG/SPLIT.jsonl, .json or .parquet")


@dataclass(frozen=True)
class LongLaMPSpec:
    config: str
    task: str
    split: str | None      # None: all three splits
    source: str | None     # local folder or file; None: the hub


def parse_longlamp_spec(spec: str, *, default_split: str | None = "test", split_kind: str | None = None) -> LongLaMPSpec:
    """``longlamp:product_review_user[:val][@DIR]``. ``split_kind`` ("user"/"temporal")
    completes a bare task name such as ``longlamp:product_review``."""
    body = spec.split(":", 1)[1] if spec.startswith("longlamp:") else spec
    source = None
    if "@" in body:
        body, source = body.split("@", 1)
        source = source or None
    parts = body.split(":")
    if len(parts) > 2 or not parts[0]:
        raise UserError(f"bad LongLaMP spec {spec!r}; expected longlamp:CONFIG[:SPLIT][@DIR] with CONFIG one of "
                        f"{', '.join(LONGLAMP_CONFIGS)}")
    config = parts[0]
    if config in LONGLAMP_TASKS and split_kind in ("user", "temporal"):
        config = f"{config}_{split_kind}"
    if config not in LONGLAMP_CONFIGS:
        raise UserError(f"unknown LongLaMP configuration {config!r}; known: {', '.join(LONGLAMP_CONFIGS)}")
    split = parts[1] if len(parts) == 2 else default_split
    if split == "validation":
        split = "val"
    if split is not None and split not in LONGLAMP_SPLITS:
        raise UserError(f"unknown LongLaMP split {split!r}; the published splits are train, val, test")
    return LongLaMPSpec(config, config.rsplit("_", 1)[0], split, source)


def task_of_spec(spec: str) -> str:
    """Our task name for a benchmark spec (``prompts.TASKS`` key or a LaMP task name)."""
    if spec.startswith("longlamp:"):
        return parse_longlamp_spec(spec).task
    if spec.startswith("lamp:"):
        q, o = _lamp_paths(spec)
        return _lamp_task(_read_json(o, "an outputs file {\"task\": \"LaMP_k\", \"golds\": [...]}"), str(o))
    raise UserError(f"not a benchmark spec: {spec!r} (expected longlamp:... or lamp:...)")


# ----------------------------------------------------------------------------- files
def _read_json(path: Path, expected: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: not found (expected {expected})")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}); expected {expected}") from None
    except json.JSONDecodeError as e:
        end = " (the file ends early: truncated?)" if text.rstrip()[-1:] not in ("]", "}") else ""
        raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}{end}; "
                        f"expected {expected}") from None


def read_table(path: Path, expected: str) -> list[Any]:
    """Rows of a .jsonl / .json (a list) / .parquet file, with one-line errors."""
    if not path.is_file():
        raise UserError(f"{path}: not found (expected {expected})")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - a truncated/foreign file is the user's problem
            raise UserError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e)[:120]}); "
                            f"truncated? expected {expected}") from None
    if path.suffix == ".jsonl":
        return read_jsonl(path, expected)  # the package's one JSONL reader (safe for U+2028 in strings)
    data = _read_json(path, expected)
    if isinstance(data, dict):
        for key in ("data", "records", "rows"):
            if isinstance(data.get(key), list):
                return data[key]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of records at the top level, got {type(data).__name__} "
                        f"(expected {expected})")
    return data


def _local_file(source: Path, config: str, split: str) -> Path:
    """The file for one configuration and split under ``source`` (a folder or a file)."""
    if source.is_file():
        return source
    if not source.is_dir():
        raise UserError(f"{source}: not found (expected a folder with {config}/{split}.jsonl, .json or .parquet)")
    for base in (source / config, source):
        for name in (f"{split}.jsonl", f"{split}.json", f"{split}.parquet"):
            if (base / name).is_file():
                return base / name
        shards = sorted(base.glob(f"{split}-*.parquet")) if base.is_dir() else []
        if shards:
            return shards[0] if len(shards) == 1 else base / f"{split}-*.parquet"
    raise UserError(f"{source}: no file for LongLaMP {config} split {split} (looked for {config}/{split}.jsonl, "
                    f".json, .parquet and {config}/{split}-*.parquet)")


def _rows_from_local(path: Path, expected: str) -> list[Any]:
    if "*" in path.name:  # several parquet shards of one split
        rows: list[Any] = []
        for shard in sorted(path.parent.glob(path.name)):
            rows.extend(read_table(shard, expected))
        return rows
    return read_table(path, expected)


# ----------------------------------------------------------------------------- hub
def _hub_rows(config: str, split: str, loader: Callable[..., Any] | None = None) -> list[Any]:
    """Rows from the hub; any network/hub failure becomes one UserError."""
    offline = offline_mode()
    quiet = []
    if loader is None:
        if not offline and not hub_reachable():
            # fail in seconds rather than after the hub client's retries (about 30 s)
            raise UserError(f"the Hugging Face dataset hub is unreachable (no connection to "
                            f"{hub_host()}) for {HUB_ID} {config}; {_LOCAL_HELP} (a copy already in the "
                            f"Hugging Face cache is used with HF_HUB_OFFLINE=1)")
        from datasets import load_dataset as loader  # noqa: N813
        quiet = _quiet_hub_logs()
    elif offline:
        raise UserError(f"the Hugging Face dataset hub is unreachable (offline mode is set) for {HUB_ID} "
                        f"{config}; {_LOCAL_HELP}")
    try:
        ds = loader(HUB_ID, config, split=split)
        return list(ds)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - connection errors come in many classes (requests, httpx, OSError, hub)
        msg = " ".join(str(e).split())[:160]
        if offline:
            raise UserError(f"the Hugging Face dataset hub is unreachable (offline mode is set) and {HUB_ID} "
                            f"{config} is not in the local Hugging Face cache; {_LOCAL_HELP}") from None
        if re.search(r"unknown split|should be one of", msg, re.I):
            raise UserError(f"{HUB_ID} {config} has no split {split!r} ({msg})") from None
        raise UserError(f"the Hugging Face dataset hub is unreachable or refused {HUB_ID} {config} "
                        f"({type(e).__name__}: {msg}); {_LOCAL_HELP}") from None
    finally:
        for lg, level in quiet:
            lg.setLevel(level)


def _quiet_hub_logs() -> list:
    """Silence the hub clients' retry warnings: the failure is reported as one UserError."""
    import logging
    saved = []
    for name in ("huggingface_hub", "datasets", "fsspec"):
        lg = logging.getLogger(name)
        saved.append((lg, lg.level))
        lg.setLevel(logging.ERROR)
    return saved


# ----------------------------------------------------------------------------- normalize
def check_profile(profile: Any, task: str, *, file: str, record: str) -> list[dict]:
    if profile is None:
        raise DataError("missing", file=file, record=record, field="profile")
    if not isinstance(profile, list):
        raise DataError(f"expected a list, got {type(profile).__name__}", file=file, record=record, field="profile")
    for i, item in enumerate(profile):
        if not isinstance(item, dict):
            raise DataError(f"expected an object, got {type(item).__name__}", file=file, record=record,
                            field=f"profile[{i}]")
        for f, kind in PROFILE_FIELDS[task]:
            v = item.get(f)
            ok = isinstance(v, str) or (kind == "num" and isinstance(v, (int, float)) and not isinstance(v, bool))
            if not ok:
                got = "nothing (missing)" if v is None else type(v).__name__
                want = "a string or number" if kind == "num" else "a string"
                raise DataError(f"expected {want}, got {got}", file=file, record=record, field=f"profile[{i}].{f}")
    return profile


def _str_field(row: dict, f: str, *, file: str, record: str) -> str:
    v = row.get(f)
    if not isinstance(v, str):
        got = "nothing (missing)" if v is None else type(v).__name__
        raise DataError(f"expected a string, got {got}", file=file, record=record, field=f)
    return v


def normalize_longlamp(rows: list[Any], config: str, split: str, *, source: str,
                       topic_aliases: bool = True) -> list[dict]:
    """Published LongLaMP rows -> our records (see the module docstring)."""
    task = config.rsplit("_", 1)[0]
    ufield = USER_FIELD[task]
    out = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"expected an object, got {type(row).__name__}", file=source, record=n)
        rid = str(row["id"]) if isinstance(row.get("id"), (str, int)) else f"{config}-{split}-{n}"
        for f in ("input", "output", "profile"):
            if f not in row:
                have = ", ".join(sorted(map(str, row))) or "none"
                raise DataError(f"missing (a LongLaMP {config} row has {ufield}, input, output, profile; "
                                f"this one has {have})", file=source, record=rid, field=f)
        rec: dict[str, Any] = {"id": rid,
                               "input": _str_field(row, "input", file=source, record=rid),
                               "output": _str_field(row, "output", file=source, record=rid)}
        profile = check_profile(row.get("profile"), task, file=source, record=rid)
        if task == "topic_writing" and topic_aliases:
            profile = [{**it, "input": it.get("input", it["summary"]), "output": it.get("output", it["content"])}
                       for it in profile]
        rec["profile"] = profile
        uid = row.get(ufield, row.get("user_id"))
        if uid is not None:
            rec["user_id"] = str(uid)
        out.append(rec)
    return out


def load_longlamp(config: str, split: str, *, source: str | Path | None = None, limit: int | None = None,
                  loader: Callable[..., Any] | None = None) -> list[dict]:
    """One LongLaMP configuration and split as our records."""
    spec = parse_longlamp_spec(f"longlamp:{config}:{split}")
    src = source if source is not None else os.environ.get(ENV_DIR) or None
    expected = f"LongLaMP {config} {split} rows ({USER_FIELD[spec.task]}, input, output, profile)"
    if src is None:
        rows, where = _hub_rows(config, split, loader), f"{HUB_ID}/{config}/{split}"
    else:
        path = _local_file(Path(src).expanduser(), config, split)
        rows, where = _rows_from_local(path, expected), str(path)
    if limit:
        rows = rows[:limit]
    if not rows:
        raise UserError(f"{where}: no rows (expected {expected})")
    return normalize_longlamp(rows, config, split, source=where)


# ----------------------------------------------------------------------------- LaMP
def _lamp_paths(spec: str) -> tuple[Path, Path]:
    body = spec.split(":", 1)[1] if spec.startswith("lamp:") else spec
    if not body:
        raise UserError("bad LaMP spec: expected lamp:QUESTIONS.json[:OUTPUTS.json]")
    q, _, o = body.partition(":")
    qp = Path(q).expanduser()
    if o:
        return qp, Path(o).expanduser()
    if "questions" not in qp.name:
        raise UserError(f"{qp}: cannot guess the outputs file (no 'questions' in the name); "
                        f"use lamp:QUESTIONS.json:OUTPUTS.json")
    return qp, qp.with_name(qp.name.replace("questions", "outputs"))


def _lamp_task(outputs: Any, file: str) -> str:
    if not isinstance(outputs, dict) or not isinstance(outputs.get("golds"), list):
        raise UserError(f"{file}: expected a LaMP outputs file {{\"task\": \"LaMP_k\", \"golds\": [{{\"id\", \"output\"}}]}}")
    m = re.fullmatch(r"LaMP[_-]?(\d+)", str(outputs.get("task", "")))
    if not m or int(m.group(1)) not in LAMP_TASKS:
        raise UserError(f"{file}: task {outputs.get('task')!r} is not a LaMP generation task "
                        f"(supported: LaMP_4, LaMP_5, LaMP_7)")
    return LAMP_TASKS[int(m.group(1))]


def _ids_problem(label: str, ids: list[str]) -> str:
    shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    return f"{len(ids)} {label} ({shown})"


def load_lamp(questions: str | Path, outputs: str | Path | None = None) -> tuple[str, list[dict]]:
    """(task name, records) from a LaMP questions file and its outputs file."""
    qpath, opath = _lamp_paths(f"lamp:{questions}:{outputs}" if outputs else f"lamp:{questions}")
    out_obj = _read_json(opath, 'a LaMP outputs file {"task": "LaMP_k", "golds": [...]}')
    task = _lamp_task(out_obj, str(opath))
    qrows = _read_json(qpath, "a LaMP questions file (a list of {id, input, profile})")
    if not isinstance(qrows, list):
        raise UserError(f"{qpath}: expected a list of questions {{id, input, profile}}, got {type(qrows).__name__}")
    golds: dict[str, str] = {}
    dup_gold, dup_q = [], []
    for n, g in enumerate(out_obj["golds"]):
        if not isinstance(g, dict) or "id" not in g:
            raise DataError("expected an object with id and output", file=str(opath), record=n, field="golds")
        gid = str(g["id"])
        out = g.get("output")
        if not isinstance(out, str):
            raise DataError(f"expected a string, got {type(out).__name__}", file=str(opath), record=gid, field="output")
        if gid in golds:
            dup_gold.append(gid)
        golds[gid] = out
    records, seen = [], set()
    for n, q in enumerate(qrows):
        if not isinstance(q, dict) or "id" not in q:
            raise DataError("expected an object with id, input, profile", file=str(qpath), record=n)
        qid = str(q["id"])
        if qid in seen:
            dup_q.append(qid)
        seen.add(qid)
        rec = {"id": qid, "input": _str_field(q, "input", file=str(qpath), record=qid),
               "output": golds.get(qid),
               "profile": check_profile(q.get("profile"), task, file=str(qpath), record=qid)}
        if q.get("user_id") is not None:
            rec["user_id"] = str(q["user_id"])
        records.append(rec)
    missing = [i for i in dict.fromkeys(r["id"] for r in records) if i not in golds]
    extra = [i for i in golds if i not in seen]
    problems = []
    if missing:
        problems.append(_ids_problem(f"question ids without a gold in {opath.name}", missing))
    if extra:
        problems.append(_ids_problem(f"gold ids without a question in {qpath.name}", extra))
    if dup_q:
        problems.append(_ids_problem(f"duplicated question ids", dup_q))
    if dup_gold:
        problems.append(_ids_problem(f"duplicated gold ids", dup_gold))
    if problems:
        raise UserError(f"{qpath} + {opath}: ids do not match: " + "; ".join(problems))
    if not records:
        raise UserError(f"{qpath}: no questions")
    return task, records


# ----------------------------------------------------------------------------- entry point
def load(spec: str, *, source: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """Records for a benchmark spec (``longlamp:...`` or ``lamp:...``)."""
    if spec.startswith("longlamp:"):
        s = parse_longlamp_spec(spec)
        return load_longlamp(s.config, s.split or "test", source=source or s.source, limit=limit)
    if spec.startswith("lamp:"):
        q, o = _lamp_paths(spec)
        recs = load_lamp(q, o)[1]
        return recs[:limit] if limit else recs
    raise UserError(f"unknown benchmark spec {spec!r}; expected longlamp:CONFIG[:SPLIT][@DIR] or "
                    f"lamp:QUESTIONS.json[:OUTPUTS.json]")
