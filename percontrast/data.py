"""Records in the LongLaMP format, read and checked.

A record is ``{"id", "input", "output", "profile": [ {task fields...}, ... ]}`` (plus
optional ``user_id``, ``date``). This module reads files (``parse_jsonl``, ``read_jsonl``,
``read_rows``: ``.jsonl`` / ``.json`` / ``.parquet``) and checks records against a task
(``validate_records``). Every problem is a ``DataError`` naming file, record and field.

Turning a spec (a path, ``builtin:...``, ``hf:...``, ``longlamp:...``, ``lamp:...``) into
records is ``percontrast.datasets.load_records``; this library module imports nothing from
``percontrast.datasets`` (``percontrast.data.load_records`` still resolves, deprecated, for
one release: ``_moved.py`` adds it).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from .errors import DataError, UserError
from .files import write_jsonl_atomic, write_text_atomic
from .prompts import Task


def parse_jsonl(text: str, source: str | Path, expected: str | None = None) -> list[Any]:
    """The package's one JSONL parser (data files, LongLaMP files, corpus sources): one JSON value per
    line, blank lines skipped. A bad line is a ``DataError`` naming ``source`` and the line number."""
    rows = []
    # Split on "\n" only: str.splitlines() also splits on U+2028/U+2029/U+0085/\x0b/\x1c.., which
    # json.dumps(ensure_ascii=False) leaves raw inside strings, and would cut a valid record in two.
    lines = text.split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            # The last piece of the split is what follows the final newline: a bad line there means
            # the file does not end with a newline, the usual sign of a cut-off download or write.
            hint = " (the last line is cut off: truncated file?)" if lineno == len(lines) else ""
            tail = f"; expected {expected}" if expected else ""
            raise DataError(f"invalid JSON at line {lineno}, column {e.colno}: {e.msg}{hint}{tail}",
                            file=str(source)) from None
    return rows


def read_text_utf8(path: Path) -> str:
    """A file's text (UTF-8, an optional BOM dropped); bad bytes are a ``DataError`` naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"not valid UTF-8 at line {line} (bad byte 0x{raw[e.start]:02x} at offset {e.start})",
                        file=str(path)) from None


def read_jsonl(path: str | Path, expected: str | None = None) -> list[Any]:
    """Rows of a JSONL file (``parse_jsonl`` on its UTF-8 text)."""
    p = Path(path)
    return parse_jsonl(read_text_utf8(p), p, expected)


def read_rows(path: str | Path) -> list[Any]:
    """Raw rows of a JSON / JSONL / Parquet file, with one-line errors for unreadable files."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", file=str(p))
    if p.is_dir():
        raise DataError("is a directory, expected a .jsonl, .json or .parquet file", file=str(p))
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            return pq.read_table(p).to_pylist()
        except Exception as e:  # noqa: BLE001 - a corrupt parquet file is the user's
            raise DataError(f"cannot read Parquet: {type(e).__name__}: {e}", file=str(p)) from None
    text = read_text_utf8(p)
    if not text.strip():
        raise DataError("file is empty", file=str(p))
    if p.suffix == ".jsonl" or (p.suffix != ".json" and not text.lstrip().startswith("[")):
        return parse_jsonl(text, p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", file=str(p)) from None
    if isinstance(data, dict):  # {"data": [...]} or {"records": [...]}
        for key in ("data", "records", "examples"):
            if isinstance(data.get(key), list):
                return data[key]
        raise DataError("expected a list of records (or an object with a 'data' list)", file=str(p))
    if not isinstance(data, list):
        raise DataError(f"expected a list of records, got {type(data).__name__}", file=str(p))
    return data


def _check_str(value: Any, where: dict, field: str, allow_empty: bool = False) -> str:
    if value is None:
        raise DataError("missing", field=field, **where)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field, **where)
    if not allow_empty and not value.strip():
        raise DataError("is empty", field=field, **where)
    _check_encodable(value, where, field)
    return value


def _check_encodable(value: str, where: dict, field: str) -> None:
    """JSON escapes like "\\ud800" give lone surrogates, which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"unpaired surrogate {value[e.start]!a} at character {e.start} (not valid Unicode)",
                        field=field, **where) from None


def validate_records(rows: Iterable[Any], task: Task, source: str, *, require_output: bool = True,
                     require_profile: bool = True) -> list[dict]:
    """Check every record against the task's fields; return normalized copies (ids as str)."""
    out, seen = [], {}
    for n, row in enumerate(rows):
        where = {"file": source, "record": n}
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", **where)
        rid = row.get("id")
        if rid is None or (isinstance(rid, str) and not rid.strip()):
            raise DataError("missing", field="id", **where)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise DataError(f"expected a string or integer, got {type(rid).__name__}", field="id", **where)
        rid = str(rid)
        _check_encodable(rid, where, "id")
        where["record"] = rid
        if rid in seen:
            raise DataError(f"duplicate id (first seen at record #{seen[rid]})", field="id", **where)
        seen[rid] = n
        _check_str(row.get("input"), where, "input")
        if require_output or row.get("output") is not None:
            _check_str(row.get("output"), where, "output")
        profile = row.get("profile")
        if profile is None:
            profile = []
            if require_profile:
                raise DataError("missing", field="profile", **where)
        if not isinstance(profile, list):
            raise DataError(f"expected a list of items, got {type(profile).__name__}", field="profile", **where)
        if require_profile and not profile:
            raise DataError("is empty (PerContrast needs at least one profile item)", field="profile", **where)
        for i, item in enumerate(profile):
            if not isinstance(item, dict):
                raise DataError(f"expected an object, got {type(item).__name__}", field=f"profile[{i}]", **where)
            for f in task.fields:
                v = item.get(f)
                if v is None:
                    raise DataError(f"missing (task {task.name} needs {', '.join(task.fields)})",
                                    field=f"profile[{i}].{f}", **where)
                if f == task.text_field:
                    _check_str(v, where, f"profile[{i}].{f}")
                elif not isinstance(v, (str, int, float)) or isinstance(v, bool):
                    raise DataError(f"expected a string or number, got {type(v).__name__}",
                                    field=f"profile[{i}].{f}", **where)
            if not task.fields and not any(isinstance(v, str) and v.strip() for v in item.values()):
                raise DataError("has no non-empty string field", field=f"profile[{i}]", **where)
            for k, v in item.items():
                if isinstance(v, str):
                    _check_encodable(v, where, f"profile[{i}].{k}")
        out.append({**row, "id": rid, "profile": profile})
    if not out:
        raise DataError("contains no records", file=source)
    return out


# ---------------------------------------------------------------- predictions files
# The LaMP/LongLaMP exchange format {"task": ..., "golds": [{"id", "output"}]}, read by ``eval
# --predictions`` and written by ``generate`` / ``eval``.

def read_predictions(path: str | Path) -> list[dict]:
    """[{"id": str, "output": str}] from an exchange-format JSON or a JSONL file."""
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


def write_predictions(out: Path, task: str, records: list[dict], texts: list[str], rows: list[dict]) -> None:
    """``predictions.json`` in the LaMP/LongLaMP exchange format, plus one JSONL row per example."""
    golds = [{"id": r["id"], "output": t} for r, t in zip(records, texts)]
    write_text_atomic(out / "predictions.json", json.dumps({"task": task, "golds": golds}, ensure_ascii=False,
                                                           indent=1))
    write_jsonl_atomic(out / "predictions.jsonl", rows)
