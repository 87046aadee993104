"""User-facing errors.

A ``UserError`` is a mistake in the user's input (a file, a record, a flag). The CLI
prints its message as one line and exits non-zero, with no traceback. Everything else
is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message is one line that names the culprit."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class DataError(UserError):
    """A bad data file or record. Formats as ``<file>: record <id or #n>: field '<f>': <problem>``."""

    def __init__(self, problem: str, *, file: str | None = None, record: str | int | None = None,
                 field: str | None = None):
        parts = []
        if file is not None:
            parts.append(str(file))
        if record is not None:
            parts.append(f"record {record}" if isinstance(record, str) else f"record #{record}")
        if field is not None:
            parts.append(f"field '{field}'")
        parts.append(problem)
        super().__init__(": ".join(parts))
        self.file, self.record, self.field = file, record, field
