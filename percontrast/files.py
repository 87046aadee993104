"""Files and folders that are never seen half-written, and the package's cache folder.

Every writer builds its result beside the target (same file system) and renames it into
place: a rename within one file system is atomic, so a reader, or a run resumed after a
crash, sees either the old complete file/folder or the new complete one, never a part.
Temp files get the usual mode (``mkstemp`` / ``mkdtemp`` would leave them 0600 / 0700).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError


def cache_dir() -> Path:
    """Where converted models and metric data live: ``$PERCONTRAST_CACHE`` or ~/.cache/percontrast."""
    return Path(os.environ.get("PERCONTRAST_CACHE", Path.home() / ".cache" / "percontrast"))


def refuse_to_replace(path: Path, overwrite: bool) -> None:
    """A command's output that exists is replaced only with --overwrite (one clear line otherwise)."""
    if Path(path).exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename it over ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so a rename never publishes
    files whose data is still only in the page cache."""
    for p in sorted(folder.rglob("*"), reverse=True):
        fsync_path(p)
    fsync_path(folder)


def fsync_path(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:   # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def publish_dir(src: Path, target: Path, *, replace: bool = True, fsync: bool = False) -> None:
    """Rename the finished folder ``src`` to ``target``.

    An existing ``target`` is moved aside first and deleted after the swap (``replace``), or
    kept, and ``src`` discarded (``replace=False``: another process finished the same job
    first). ``fsync`` flushes ``src`` before it is published.
    """
    src, target = Path(src), Path(target)
    if fsync:
        fsync_tree(src)
    if target.exists():
        if not replace:
            shutil.rmtree(src, ignore_errors=True)
            return
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, aside / "x")
        os.replace(src, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        try:
            os.replace(src, target)
        except OSError:
            if replace or not target.exists():
                raise
            shutil.rmtree(src, ignore_errors=True)   # lost a race to another process: keep theirs
    if fsync:
        fsync_path(target.parent)


@contextmanager
def building_dir(target: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """``with building_dir(out) as tmp:`` fill ``tmp``; on success it becomes ``out``
    (``publish_dir``), on any exception it is deleted and ``out`` is untouched."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        publish_dir(tmp, target, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
