"""Everything that produces records: the front door ``load_records`` and the sources behind it.

``load_records(spec, task)`` turns a spec into validated records:

* a ``.jsonl`` / ``.json`` (a list of records) / ``.parquet`` file (read by ``data.read_rows``);
* ``builtin:sample-train`` / ``builtin:sample-test`` (6 users x 6 short messages, hand-written,
  shipped with the package in ``percontrast/assets``);
* a Hugging Face dataset: ``hf:NAME[:SPLIT]`` or a ``save_to_disk`` folder;
* a benchmark spec handled by ``longlamp.py``: ``longlamp:<config>[:split][@dir]``, ``lamp:...``.

Every problem is a ``DataError`` / ``UserError`` in one line. Modules here: ``splits`` (user /
temporal splits, leak guard, dataset writer), ``email``, ``sotu`` (real corpora), ``longlamp``
(LongLaMP / LaMP loaders), ``synthetic`` (the labelled personal-token benchmark). This file
stays small and imports neither torch nor ``datasets`` at import time; the submodules are
imported when a spec needs them. Commands import from here; library modules directly under
``percontrast/`` never do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import read_rows, validate_records
from ..errors import UserError
from ..prompts import Task

ASSETS = Path(__file__).resolve().parent.parent / "assets"   # percontrast/assets
BUILTIN = {"builtin:sample-train": ASSETS / "sample-train.jsonl",
           "builtin:sample-test": ASSETS / "sample-test.jsonl"}


def load_records(spec: str, task: Task, *, require_output: bool = True, require_profile: bool = True,
                 limit: int | None = None) -> list[dict]:
    """Load and validate records from a file path, a built-in name, a Hugging Face dataset or a
    benchmark spec (see the module docstring); ``limit`` keeps the first rows."""
    if spec in BUILTIN:
        rows = read_rows(BUILTIN[spec])
    elif spec.split(":", 1)[0] in ("longlamp", "lamp") and ":" in spec:
        from . import longlamp  # loaders for the public benchmarks (hub or local files)
        rows = longlamp.load(spec)
    elif spec.startswith("builtin:"):
        raise UserError(f"unknown built-in data {spec!r}; known: {', '.join(BUILTIN)}")
    elif spec.startswith("hf:") or (Path(spec).is_dir() and (Path(spec) / "state.json").exists()):
        rows = _hf_rows(spec)
    else:
        rows = read_rows(spec)
    if limit is not None:
        rows = rows[:limit]
    return validate_records(rows, task, spec, require_output=require_output, require_profile=require_profile)


def _hf_rows(spec: str) -> list[Any]:
    """A Hugging Face dataset: ``hf:NAME[:SPLIT]`` (hub or HF cache) or a ``save_to_disk`` folder."""
    import datasets  # the Hugging Face package (absolute import), not this folder

    try:
        if spec.startswith("hf:"):
            name, _, split = spec[3:].partition(":")
            from ..hub import hub_reachable, offline_mode
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
