"""``percontrast export-weights``: the exported weights are score's clip(PIR), aligned to the training ids,
loadable as a datasets folder, equal in loss to the trainer's refresh=once PerCE, and the ms-swift file
follows ms-swift's per-message loss_scale format (docs/export-weights.md cites the ms-swift sources)."""
import json
import math

import pytest

from tests.helpers import run_cli

DATA = ["--data", "builtin:sample-train", "--limit", "6", "--task", "email", "--k", "2"]
# tiny-random's PIR lies in about [-0.09, 0.11] nats, so the paper's [0.8, 5] would clip every token to 0.8;
# this clip leaves a mix of floor, ceiling and in-between weights, so alignment mistakes show.
CLIP = ["--clip-min", "0.002", "--clip-max", "0.03"]


def _export(out, *extra):
    rc, _, err = run_cli(["export-weights", "--model", "tiny-random", *DATA, *CLIP, "--batch-size", "4",
                          "--output-dir", str(out), "--no-progress", *extra])
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export in every format and one ``score`` run, same records, batches and clip."""
    root = tmp_path_factory.mktemp("export")
    out = _export(root / "w", "--formats", "hf", "parquet", "jsonl", "swift")
    rc, _, err = run_cli(["score", "--model", "tiny-random", *DATA, *CLIP, "--batch-size", "4",
                          "--output-dir", str(root / "s"), "--no-html"])
    assert rc == 0, err
    scores = json.loads((root / "s" / "scores.json").read_text())["examples"]
    return out, scores


@pytest.fixture(scope="module")
def rows(exported):
    import datasets
    return datasets.load_from_disk(str(exported[0] / "dataset")).to_list()


@pytest.fixture(scope="module")
def records():
    from percontrast.datasets import load_records
    from percontrast.prompts import get_task
    return load_records("builtin:sample-train", get_task("email"), limit=6)


@pytest.fixture(scope="module")
def builder(tiny):
    from percontrast.options import PromptOptions
    return PromptOptions(task="email", k=2).prompt_builder(tiny[1])


def _completion(row, col):
    return [v for v, m in zip(row[col], row["completion_mask"]) if m]


def test_weights_are_score_clip_pir_exactly(exported, rows):
    # Bound 0, by construction: export runs score's own score_records (score_batch, then clip_weights) on
    # the same model, records and batches, so the float32 tensors are bit-identical; the dataset stores
    # them in a float32 column (exact) and reads them back as Python floats (exact widening); scores.json
    # holds the repr of the same Python floats (exact round trip).
    import numpy as np
    _, scores = exported
    lo, hi = float(np.float32(0.002)), float(np.float32(0.03))   # clamp compares in the tensor's float32
    assert [r["id"] for r in rows] == [s["id"] for s in scores]
    kinds = {"floor": 0, "ceiling": 0, "between": 0}
    for r, s in zip(rows, scores):
        assert _completion(r, "weights") == s["weights"]
        assert r["pir"] == s["pir"]
        assert _completion(r, "input_ids") == s["token_ids"]
        for w, p in zip(s["weights"], s["pir"]):   # and they are clip(PIR, m, M) of that PIR
            assert w == (lo if p < lo else hi if p > hi else p)
            kinds["floor" if p < lo else "ceiling" if p > hi else "between"] += 1
    assert all(kinds.values()), kinds   # the clip leaves all three kinds, so the checks above can fail


def test_columns_align_with_the_training_ids(rows, records, builder, tiny):
    tok = tiny[1]
    for r, rec in zip(rows, records):
        enc = builder.encode(rec)
        P, n = len(enc["prompt_with"]), len(r["input_ids"])
        assert r["id"] == rec["id"] and r["user_id"] == rec["user_id"]
        assert all(len(r[c]) == n for c in ("attention_mask", "labels", "completion_mask", "weights"))
        assert r["input_ids"] == enc["prompt_with"] + enc["response"]
        assert r["attention_mask"] == [1] * n
        assert r["completion_mask"] == [0] * P + [1] * (n - P)
        assert r["labels"] == [-100] * P + enc["response"]          # -100 exactly on the prompt
        assert r["weights"][:P] == [0.0] * P and all(w > 0 for w in r["weights"][P:])
        assert len(r["pir"]) == n - P
        # the response ids are the record's output tokenized on its own, then the end-of-turn id
        assert enc["response"] == tok(rec["output"], add_special_tokens=False)["input_ids"] + [builder.end_id]
        assert tok.decode(r["input_ids"][P:-1], clean_up_tokenization_spaces=False) == rec["output"]


def test_every_format_holds_the_same_rows_and_the_metadata(exported, rows):
    import datasets
    out, _ = exported
    info = json.loads((out / "export_info.json").read_text())
    assert info["model"] == "tiny-random" and info["clip_min"] == 0.002 and info["clip_max"] == 0.03
    assert "refresh=once" in info["signal"] and "NOT the paper's bootstrap" in info["signal"]
    assert info["weights_dtype"] == "float32" and info["examples"] == len(rows) == 6
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert json.loads(ds.info.description)["clip_max"] == 0.03
    assert ds.features["weights"].feature.dtype == "float32" and ds.features["input_ids"].feature.dtype == "int32"
    assert datasets.Dataset.from_parquet(str(out / "weights.parquet")).to_list() == rows
    assert [json.loads(line) for line in (out / "weights.jsonl").read_text().splitlines()] == rows


def test_swift_file_follows_ms_swift_loss_scale_format(exported, rows, records, builder, tiny):
    """ms-swift >= 4.2.0 (docs/source_en/Customization/Custom-dataset.md): {"messages": [...]} with roles
    user / assistant, string content, and an optional float "loss_scale" per assistant message. Its
    template tokenizes each segment on its own (Template._encode_context_list), so each segment must give
    back exactly its ids, and the segments must add up to the completion."""
    out, _ = exported
    tok = tiny[1]
    lines = (out / "swift.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)
    merged = 0
    for line, r, rec in zip(lines, rows, records):
        obj = json.loads(line)
        assert set(obj) == {"messages"}
        user, *assistant = obj["messages"]
        assert user.keys() == {"role", "content"} and user["role"] == "user"
        # the user text renders to exactly the with-profile prompt the weights were computed under
        assert builder.prompt_ids(user["content"]) == builder.encode(rec)["prompt_with"]
        assert assistant and all(m.keys() == {"role", "content", "loss_scale"} and m["role"] == "assistant"
                                 and isinstance(m["content"], str) and m["content"]
                                 and isinstance(m["loss_scale"], float) and m["loss_scale"] > 0 for m in assistant)
        assert "".join(m["content"] for m in assistant) == rec["output"]
        ids, weights = _completion(r, "input_ids")[:-1], _completion(r, "weights")[:-1]   # end id: swift's own
        at = 0
        for m in assistant:
            seg = tok(m["content"], add_special_tokens=False)["input_ids"]
            assert seg == ids[at:at + len(seg)]
            span = weights[at:at + len(seg)]
            if all(w == span[0] for w in span):
                assert m["loss_scale"] == span[0]                   # one run: its weight exactly
            else:
                merged += len(span)
                assert m["loss_scale"] == pytest.approx(sum(span) / len(span), rel=1e-15)
            at += len(seg)
        assert at == len(ids)
        # neighbours differ (ms-swift would join equal ones before tokenizing)
        assert all(a["loss_scale"] != b["loss_scale"] for a, b in zip(assistant, assistant[1:]))
    info = json.loads((out / "export_info.json").read_text())["swift"]
    assert info["merged_tokens"] == merged and "--is_binary_loss_scale false" in info["command"]


def test_segments_merge_a_cut_inside_a_character(tiny):
    """A byte-level BPE splits an emoji into several tokens; a cut between them decodes to U+FFFD and does
    not re-tokenize, so those runs merge and share their mean weight; clean cuts stay exact."""
    from percontrast.weights_export import weight_segments
    tok = tiny[1]
    text = "Ride 🚲 home"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    inside = [i for i, p in enumerate(pieces) if "\ufffd" in p]
    assert len(inside) >= 2, pieces   # the emoji is several byte tokens in this tokenizer
    weights = [0.5 + 0.25 * i for i in range(len(ids))]   # every token its own run
    segs, runs, exact = weight_segments(tok, ids, weights)
    assert exact and runs == len(ids) and len(segs) < len(ids)
    assert "".join(s.text for s in segs) == text
    for s in segs:
        span = weights[s.start:s.end]
        assert tok(s.text, add_special_tokens=False)["input_ids"] == ids[s.start:s.end]
        assert s.loss_scale == (span[0] if len(span) == 1 else sum(span) / len(span))
        if len(span) > 1:
            assert any(i in inside for i in range(s.start, s.end))   # only the unsafe cuts were merged
    # equal neighbours are one segment with that weight exactly
    segs, runs, _ = weight_segments(tok, ids, [0.8] * len(ids))
    assert runs == 1 and [(s.text, s.loss_scale) for s in segs] == [(text, 0.8)]


def test_loss_from_export_equals_trainer_refresh_once_first_step(tmp_path, records):
    """A consumer's loss over the exported columns (right-padded batch, full logits, shift by one,
    sum(w * nll) / n) equals PerCETrainer's first refresh=once PerCE loss on the same examples.

    Float64 bound: the two sides run the same float64 model on two layouts of the same batch (the
    trainer's left-padded aligned batch with logits_to_keep, the consumer's right-padded one with full
    logits), so they differ only in summation order: |d logp| <~ u * sum|terms| with u = 1.1e-16 and
    sums of <= 49152 (logsumexp) or 64-256 (matmul) terms of size <= ~10, i.e. < 1e-10 in the worst
    case and ~1e-13 in practice; PIR is a difference of two such values and its weight at most 0.03
    here, nll <= ~11 (ln V): |d loss| <= max w * max|d nll| + max nll * max|d w| < 0.03e-10 + 11 * 2e-10
    < 3e-9. TOL = 1e-8."""
    import datasets
    import torch

    from percontrast.commands.train import TrainConfig, build_trainer
    from percontrast.models import load_model
    from percontrast.weights_export import collate_weighted, weighted_loss_from_logits
    TOL = 1e-8

    out = _export(tmp_path / "w", "--dtype", "float64", "--formats", "hf")
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert ds.features["weights"].feature.dtype == "float64"
    model, tok = load_model("tiny-random", dtype="float64")
    batch = collate_weighted(ds.to_list(), tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = weighted_loss_from_logits(logits, batch["labels"], batch["weights"]).item()
    ce = weighted_loss_from_logits(logits, batch["labels"], (batch["labels"] != -100).double()).item()

    cfg = TrainConfig(model="tiny-random", dtype="float64", data="builtin:sample-train", limit=6, task="email",
                      k=2, method="perce", refresh="once", clip_min=0.002, clip_max=0.03, max_steps=1,
                      batch_size=6, output_dir=str(tmp_path / "run"), progress=False, report=False)
    model_t, tok_t = load_model("tiny-random", dtype="float64")
    trainer, _ = build_trainer(cfg, model_t, tok_t, records)
    model_t.train()
    theirs = trainer.compute_loss(model_t, trainer.data_collator(trainer.train_dataset.rows)).item()
    assert trainer.counterfactual_passes == 1          # it estimated PIR (refresh=once, first visit)
    assert abs(ours - theirs) <= TOL, (ours, theirs)
    assert abs(ce - theirs) > 1e3 * TOL                # the weights matter: plain CE is far off


# ----------------------------------------------------------------------------- user mistakes
GOOD = {"id": "a", "user_id": "u1", "input": "Write about the weekend", "output": "Cycling by the river.",
        "profile": [{"title": "Ride", "text": "I cycle along the river"}]}


def _fail(argv):
    rc, out, err = run_cli(["export-weights", "--model", "tiny-random", "--task", "email", "--no-progress", *argv])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case,needle", [
    ("missing_file", "nope.jsonl: file not found"),
    ("no_output", "record a: field 'output': missing"),
    ("bad_format", "formats: unknown format 'axolotl'; choose from hf, parquet, jsonl, swift"),
    ("swift_zero_clip", "formats: swift needs clip_min > 0"),
    ("negative_clip", "clip_min -0.5 < 0"),
    ("exists", "exists; pass --overwrite"),
])
def test_user_mistakes_are_one_line_and_leave_nothing(tmp_path, case, needle):
    data = tmp_path / "d.jsonl"
    rows = [{k: v for k, v in GOOD.items() if k != "output"}] if case == "no_output" else [GOOD]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--data", str(tmp_path / "nope.jsonl") if case == "missing_file" else str(data), "--output-dir", str(out)]
    argv += {"bad_format": ["--formats", "hf", "axolotl"], "swift_zero_clip": ["--clip-min", "0"],
             "negative_clip": ["--clip-min", "-0.5", "--formats", "hf"]}.get(case, [])
    if case == "exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    line = _fail(argv)
    assert needle in line, line
    if case in ("missing_file", "no_output"):
        assert str(tmp_path) in line          # names the file
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp folder left


def test_a_failure_while_writing_leaves_no_partial_output(tmp_path, monkeypatch):
    import percontrast.weights_export as we
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    real = we._write

    def half(folder, *a, **k):
        real(folder, *a, **k)          # every file written into the temp folder, then the disk "fills up"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(we, "_write", half)
    with pytest.raises(OSError):
        run_cli(["export-weights", "--model", "tiny-random", "--task", "email", "--data", str(data),
                 "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_overwrite_replaces_the_folder_whole(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    rc, _, err = run_cli(["export-weights", "--model", "tiny-random", "--task", "email", "--data", str(data),
                          "--output-dir", str(out), "--no-progress", "--overwrite", "--formats", "jsonl"])
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["export_info.json", "weights.jsonl"]
    row = json.loads((out / "weights.jsonl").read_text())
    assert row["id"] == "a" and all(math.isclose(w, 0.8, rel_tol=2 ** -23) for w, m in
                                    zip(row["weights"], row["completion_mask"]) if m)   # float32(0.8)


def test_help_says_offline_weights_are_not_the_papers_bootstrap():
    from percontrast.cli import build_parser
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "export-weights" in a.choices)
    text = " ".join(sub.choices["export-weights"].format_help().split())
    assert "NOT the paper's bootstrap" in text and "refresh=once" in text
