"""Records in the LongLaMP format, read and checked.

A record is ``{"id", "input", "output", "profile": [ {task fields...}, ... ]}`` (plus
optional ``user_id``, ``date``). Sources: a ``.jsonl`` / ``.json`` (a list of records)
/ ``.parquet`` file, ``builtin:sample-train`` / ``builtin:sample-test`` (6 users x 6 short messages, hand-written, shipped with the package),
a Hugging Face dataset (``hf:NAME[:SPLIT]`` or a ``save_to_disk`` folder), or a benchmark spec handled by ``benchmarks.py`` (``longlamp:<config>[:split]``,
``lamp:...``). Every problem is a ``DataError`` naming file, record and field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .errors import DataError, UserError
from .prompts import Task

ASSETS = Path(__file__).parent / "assets"
BUILTIN = {"builtin:sample-train": ASSETS / "sample-train.jsonl",
           "builtin:sample-test": ASSETS / "sample-test.jsonl"}


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


def load_records(spec: str, task: Task, *, require_output: bool = True, require_profile: bool = True,
                 limit: int | None = None) -> list[dict]:
    """Load and validate records from a file path, a built-in name or a benchmark spec."""
    if spec in BUILTIN:
        rows, source = read_rows(BUILTIN[spec]), spec
    elif spec.split(":", 1)[0] in ("longlamp", "lamp") and ":" in spec:
        from . import benchmarks  # loaders for the public benchmarks (hub or local files)
        rows, source = benchmarks.load(spec), spec
    elif spec.startswith("builtin:"):
        raise UserError(f"unknown built-in data {spec!r}; known: {', '.join(BUILTIN)}")
    elif spec.startswith("hf:") or (Path(spec).is_dir() and (Path(spec) / "state.json").exists()):
        rows, source = _hf_rows(spec), spec
    else:
        rows, source = read_rows(spec), spec
    if limit is not None:
        rows = rows[:limit]
    return validate_records(rows, task, source, require_output=require_output, require_profile=require_profile)


def _hf_rows(spec: str) -> list[Any]:
    """A Hugging Face dataset: ``hf:NAME[:SPLIT]`` (hub or HF cache) or a ``save_to_disk`` folder."""
    import datasets

    try:
        if spec.startswith("hf:"):
            name, _, split = spec[3:].partition(":")
            from .hub import hub_reachable, offline_mode
            if offline_mode() or not hub_reachable():
                datasets.config.HF_HUB_OFFLINE = True  # use the local cache, fail in seconds
            ds = datasets.load_dataset(name, split=split or "train")
        else:
            ds = datasets.load_from_disk(spec)
            if isinstance(ds, datasets.DatasetDict):
                raise UserError(f"{spec}: holds splits {list(ds)}; point at one split's folder")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - hub/cache failures are reported in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{spec}: could not load the dataset: {msg[:300]}") from None
    return ds.to_list()


def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> None:
    """Write JSONL via a temp file + rename, so a crash never leaves half a file."""
    import os
    import tempfile

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    import os
    import tempfile

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
