"""PerCESFTTrainer on a ``percontrast export-weights`` dataset: offline weights (this project's
refresh=once-style variant, no E-step), read straight from the export's datasets folder.

(a) on the export's batch, the first step's loss and (b) every gradient entry are PerCETrainer's with
--refresh once, bitwise; whole 2-step SGD runs end on the same weights and (c) move every trainable
parameter; (d) what would mislabel or misalign the weights is refused in one line; (e) the examples in
docs/export-weights.md and docs/trl.md ("Training on exported weights") run as written.

Why exact (tolerance 0), not a bound: the export scores all 6 records in ONE batch (--batch-size 6),
sorted by length as ``score_records`` buckets them, through ``PairedCollator`` and ``score_batch``
(``with_profile_logits`` minus ``counterfactual_logits``), in float64, and stores the float64 PIR; the
wide clip [-50, 50] leaves it unchanged, so the weights ARE that PIR. PerCETrainer's first refresh=once
step on the same 6 rows in the same order builds the same tensors with the same collator and computes
PIR with the same two functions (its with-profile log-probs come from the training forward: the same
kernels, and tiny-random has no dropout, checked). Both trainers then run ``with_profile_logits`` and
``losses.weighted_nll`` on the same tensors, so loss and gradients are the same float64 operations in
the same order. What could differ is the wiring (a shifted weight, another layout, TRL's loss scaling):
any such slip changes the loss by far more than a rounding (the PIR here is of order 0.01-0.1 per token,
of mixed sign, checked below against plain CE and against weights shifted by one token).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import TrainingArguments

from helpers import ROOT, run_cli
from percontrast.commands.train import ListDataset, TrainConfig, build_trainer
from percontrast.datasets import load_records
from percontrast.encoding import PairedCollator
from percontrast.models import load_model
from percontrast.options import LossOptions
from percontrast.prompts import get_task
from percontrast.trainer import PerCETrainer, has_dropout
from percontrast.trl_sft import PerCESFTConfig, PerCESFTError, PerCESFTTrainer

N = 6
DATA = ["--data", "builtin:sample-train", "--limit", str(N), "--task", "email", "--k", "2"]
# Wide clip: the weights are the PIR itself (tiny-random's PIR is about +-0.1), so any misalignment shows.
WIDE = dict(clip_min=-50.0, clip_max=50.0, allow_negative_clip=True)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("offline") / "w"
    rc, _, err = run_cli(["export-weights", "--model", "tiny-random", "--dtype", "float64", *DATA,
                          "--clip-min", "-50", "--clip-max", "50", "--allow-negative-clip", "--formats", "hf",
                          "--batch-size", str(N), "--output-dir", str(out), "--no-progress"])
    assert rc == 0, err
    return out


@pytest.fixture
def exported(export_dir) -> Dataset:
    ds = load_from_disk(str(export_dir / "dataset"))
    assert ds.features["weights"].feature.dtype == "float64"   # the PIR as computed, not a rounding of it
    return ds


@pytest.fixture(scope="module")
def records():
    return load_records("builtin:sample-train", get_task("email"), limit=N)


def _tiny64():
    return load_model("tiny-random", dtype="float64")


def _config(tmp_path, **kw) -> PerCESFTConfig:
    base = dict(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none",
                per_device_train_batch_size=N, save_strategy="no", logging_steps=1, disable_tqdm=True,
                max_length=None, seed=0, data_seed=0, dataloader_num_workers=0, method="perce", refresh="once",
                **WIDE)
    base.update(kw)
    return PerCESFTConfig(**base)


def _score_order(rows) -> list[int]:
    """The order in which the export's one batch held the records (score_records' bucketing: a stable
    sort by with-profile prompt + response length)."""
    return sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_with"]) + len(rows[i]["response"]))


def _refresh_once_trainer(tmp_path, records):
    """PerCETrainer as ``percontrast train --method perce --refresh once`` builds it, same prompt options."""
    cfg = TrainConfig(model="tiny-random", dtype="float64", data="builtin:sample-train", limit=N, task="email",
                      k=2, method="perce", refresh="once", **WIDE, max_steps=1, batch_size=N,
                      output_dir=str(tmp_path / "run"), progress=False, report=False)
    model, tok = _tiny64()
    trainer, _ = build_trainer(cfg, model, tok, records)
    return trainer, model, tok


# -- (a), (b) one step, the same batch -------------------------------------------------------------------
def test_first_step_loss_and_gradients_are_percetrainers_refresh_once(tmp_path, exported, records):
    ours, model_a, tok = _refresh_once_trainer(tmp_path, records)
    assert not has_dropout(model_a)   # train-mode and eval-mode forwards are the same computation
    rows = ours.train_dataset.rows
    model_b, _ = _tiny64()
    trl = PerCESFTTrainer(model=model_b, args=_config(tmp_path), train_dataset=exported, processing_class=tok)
    assert trl.offline_weights and trl.offline_weights_info["model"] == "tiny-random"
    for i, row in enumerate(rows):   # the export's ids are the trainer's: prompt, then the response on its own
        got = trl.train_dataset[i]
        assert (got["prompt_with"], got["response"], got["idx"]) == (row["prompt_with"], row["response"], i)
    order = _score_order(rows)
    batch = trl.data_collator([trl.train_dataset[i] for i in order])
    ref = ours.data_collator([rows[i] for i in order])
    for k in ("input_ids", "attention_mask", "position_ids", "resp_start", "response_ids", "response_mask",
              "labels", "idx"):
        assert torch.equal(batch[k], ref[k]), k
    n = int(ref["response_mask"].sum())
    results = []
    for tr, model, b in ((ours, model_a, ref), (trl, model_b, batch)):
        model.zero_grad(set_to_none=True)
        loss = tr.training_step(model, {k: v.clone() for k, v in b.items()}, num_items_in_batch=n)
        results.append((loss, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    assert ours.counterfactual_passes == 1 and trl.counterfactual_passes == 0   # the E-step ran there, not here
    assert torch.equal(la, lb), (la.item(), lb.item())
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    # n is the optimizer step's token count (num_items_in_batch), not this micro-batch's: with twice the
    # tokens in the step the loss halves, exactly (a division by 2n is one by n, then by a power of two).
    with torch.no_grad():
        half = trl.compute_loss(model_b, {k: v.clone() for k, v in batch.items()}, num_items_in_batch=2 * n)
    assert torch.equal(2 * half, lb.to(half.dtype)), (half.item(), lb.item())
    # Not blind: plain CE, and the same weights shifted by one token, give clearly different losses.
    from percontrast.losses import weighted_nll
    from percontrast.pir import token_logprobs
    from percontrast.scoring import with_profile_logits
    with torch.no_grad():
        logp = token_logprobs(with_profile_logits(model_b, batch), batch["response_ids"])
    mask = batch["response_mask"]
    for w in (None, torch.roll(batch["weights"], 1, dims=1)):
        other = weighted_nll(logp, w, mask, num_items=n)
        assert abs(other.item() - lb.item()) > 1e-4, (other.item(), lb.item())


# -- whole runs; (c) every trainable parameter learns ----------------------------------------------------
def test_two_sgd_steps_equal_refresh_once_and_move_every_parameter(tmp_path, exported, records):
    """2 SGD steps of the full batch (2 epochs of 6 rows), float64, sequential sampling over the rows in the
    export's batch order: step 1 is the batch the export scored (so its PIR is PerCETrainer's first-visit PIR,
    see the module docstring), step 2 the same rows again, where refresh=once reuses the PIR cached at step 1,
    the very values the export holds. So offline == refresh=once here, bitwise, in the logged losses and the
    final weights (tolerance 0). TRL's default gradient checkpointing stays on in PerCESFTTrainer (the
    recomputed forward is the same kernels on the same inputs, as tests/test_trl_sft.py relies on)."""
    model_a, tok = _tiny64()
    from percontrast.options import PromptOptions
    builder = PromptOptions(task="email", k=2).prompt_builder(tok)
    rows = [dict(builder.encode(r), idx=i) for i, r in enumerate(records)]
    order = _score_order(rows)
    common = dict(per_device_train_batch_size=N, max_steps=2, learning_rate=5e-2, lr_scheduler_type="constant",
                  optim="sgd", train_sampling_strategy="sequential", seed=0, data_seed=0, use_cpu=True,
                  report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
                  dataloader_num_workers=0)
    ours = PerCETrainer(model=model_a, args=TrainingArguments(output_dir=str(tmp_path / "ref"), **common,
                                                               remove_unused_columns=False),
                        train_dataset=ListDataset([rows[i] for i in order]),
                        data_collator=PairedCollator(tok.pad_token_id),
                        perce_args=LossOptions(method="perce", refresh="once", **WIDE))
    ours.train()
    model_b, _ = _tiny64()
    before = {k: p.detach().clone() for k, p in model_b.named_parameters() if p.requires_grad}
    trl = PerCESFTTrainer(model=model_b, args=_config(tmp_path, **common), train_dataset=exported.select(order),
                          processing_class=tok)
    trl.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model_b.modules())   # TRL's default, on
    assert ours.counterfactual_passes == 1 and trl.counterfactual_passes == 0
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (ours, trl)]
    assert len(losses[1]) == 2 and losses[0] == losses[1], losses
    logs = [h for h in trl.state.log_history if "loss" in h]
    assert all(h["pir_refreshed"] == 0.0 and "mean_weight" in h for h in logs)   # the logs say: no E-step
    for (k, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters(), strict=True):
        assert torch.equal(p, q), k
    unchanged = [k for k, p in model_b.named_parameters() if p.requires_grad and torch.equal(p, before[k])]
    assert before and not unchanged, f"parameters that did not move: {unchanged[:5]}"


def test_remove_unused_columns_keeps_the_weights(tmp_path, exported):
    """TRL's default remove_unused_columns=True drops what the model's forward does not take, unless the
    trainer names it; the batches must still carry the weights."""
    model, tok = load_model("tiny-random")
    trl = PerCESFTTrainer(model=model, args=_config(tmp_path, remove_unused_columns=True,
                                                    per_device_train_batch_size=2),
                          train_dataset=exported, processing_class=tok)
    batch = next(iter(trl.get_train_dataloader()))
    assert "weights" in batch and batch["weights"].shape == batch["response_mask"].shape
    assert (batch["weights"] != 0).any()


# -- (d) refusals -----------------------------------------------------------------------------------------
def _one_line(err: Exception, *words: str) -> None:
    msg = str(err)
    assert "\n" not in msg and all(w in msg for w in words), msg


def _edit(rows: list[dict], case: str) -> list[dict]:
    r = dict(rows[0])
    P = r["completion_mask"].index(1)
    if case == "short_weights":
        r["weights"] = r["weights"][:-1]
    elif case == "prompt_weights":
        r["weights"] = [1.0] + r["weights"][1:]
    elif case == "labels_disagree":
        r["labels"] = [-100] * (P + 1) + r["labels"][P + 1:]
    elif case == "gap":
        r["completion_mask"] = r["completion_mask"][:P + 1] + [0] + r["completion_mask"][P + 2:]
        r["labels"] = r["labels"][:P + 1] + [-100] + r["labels"][P + 2:]
    elif case == "padded":
        r["attention_mask"] = r["attention_mask"][:-1] + [0]
    elif case == "vocab":
        r["input_ids"] = r["input_ids"][:-1] + [10 ** 7]
        r["labels"] = r["labels"][:-1] + [10 ** 7]
    elif case == "no_completion":
        r["completion_mask"] = [0] * len(r["input_ids"])
        r["labels"] = [-100] * len(r["input_ids"])
    return [r] + rows[1:]


@pytest.mark.parametrize("case,words", [
    ("short_weights", ["train row 0", "'weights' has", "input_ids"]),
    ("prompt_weights", ["row 0", "non-zero on the prompt"]),
    ("labels_disagree", ["row 0", "'labels' and 'completion_mask' disagree"]),
    ("gap", ["row 0", "one run of tokens at the end"]),
    ("padded", ["row 0", "attention_mask"]),
    ("vocab", ["row 0", "outside the tokenizer"]),
    ("no_completion", ["row 0", "no completion tokens"]),
])
def test_rows_that_would_misalign_the_weights_are_refused_in_one_line(tmp_path, exported, case, words):
    model, tok = load_model("tiny-random")
    ds = Dataset.from_list(_edit(exported.to_list(), case))
    with pytest.raises(PerCESFTError) as e:
        PerCESFTTrainer(model=model, args=_config(tmp_path), train_dataset=ds, processing_class=tok)
    _one_line(e.value, *words)
    assert f"(id {ds[0]['id']})" in str(e.value)   # names the record


@pytest.mark.parametrize("case,words", [
    ("no_mask", ["'completion_mask' or 'labels'"]),
    ("no_input_ids", ["'input_ids'", "missing"]),
    ("text_eval", ["eval_dataset", "text"]),
])
def test_datasets_of_the_wrong_shape_are_refused_in_one_line(tmp_path, exported, case, words):
    model, tok = load_model("tiny-random")
    ds, kw = exported, {}
    if case == "no_mask":
        ds = exported.remove_columns(["completion_mask", "labels"])
    elif case == "no_input_ids":
        ds = exported.remove_columns(["input_ids"])
    else:
        kw["eval_dataset"] = Dataset.from_list([{"prompt": "Plan my day. ", "completion": "Chess.",
                                                 "profile": ["I play chess."]}])
    with pytest.raises(PerCESFTError) as e:
        PerCESFTTrainer(model=model, args=_config(tmp_path), train_dataset=ds, processing_class=tok, **kw)
    _one_line(e.value, *words)


@pytest.mark.parametrize("kw,words", [
    (dict(method="lossce"), ["method='lossce'", "method='perce'"]),
    (dict(method="ce", **WIDE), ["method='ce'"]),
    (dict(refresh="step"), ["refresh='once'", "not refresh='step'"]),
    (dict(refresh="every_k"), ["refresh='once'"]),
    (dict(clip_min=0.8, clip_max=5.0), ["exported with clip_min=-50.0, clip_max=50.0", "clip_min=0.8"]),
])
def test_a_config_that_does_not_match_the_export_is_refused_in_one_line(tmp_path, exported, kw, words):
    model, tok = load_model("tiny-random")
    with pytest.raises(PerCESFTError) as e:
        PerCESFTTrainer(model=model, args=_config(tmp_path, **kw), train_dataset=exported, processing_class=tok)
    _one_line(e.value, *words)


@pytest.mark.parametrize("kw,word", [(dict(packing=True), "packing"), (dict(padding_free=True), "padding_free"),
                                     (dict(dataset_kwargs={"skip_prepare_dataset": True}), "skip_prepare_dataset")])
def test_packing_and_skipping_preparation_are_refused_in_one_line(tmp_path, kw, word):
    # TRL's packing would concatenate rows and drop the weights column; skip_prepare_dataset would skip the
    # checks above. Both are refused by the config, before any data is read.
    with pytest.raises(PerCESFTError) as e:
        _config(tmp_path, **kw)
    _one_line(e.value, word)


# -- (e) the documented examples run ----------------------------------------------------------------------
SECTION = "## Training on exported weights"


def _section(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    assert SECTION in text, f"{path.name} lacks the section {SECTION!r}"
    rest = text.split(SECTION, 1)[1]
    return rest.split("\n## ", 1)[0]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_the_documented_offline_examples_run(tmp_path, monkeypatch):
    """docs/export-weights.md: the export command and the PerCESFTTrainer example of "Training on exported
    weights", then every other python block of the page (the plain loop), as written; docs/trl.md's section
    holds the same command and example (fenced ```py there, so that tests/test_trl_sft.py, which runs the one
    ```python PerCESFTTrainer example of docs/trl.md without an export, does not pick it up)."""
    page = ROOT / "docs" / "export-weights.md"
    sec = _section(page)
    (cmd,), (example,) = _blocks(sec, "bash"), _blocks(sec, "python")
    trl_sec = _section(ROOT / "docs" / "trl.md")
    assert _blocks(trl_sec, "bash") == [cmd] and _blocks(trl_sec, "py") == [example]
    assert len(example.strip().splitlines()) <= 10
    argv = shlex.split(cmd.replace("\\\n", " "), comments=True)
    assert argv[:2] == ["percontrast", "export-weights"]
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(argv[1:] + ["--no-progress"])
    assert rc == 0, err
    ns: dict = {}
    exec(compile(example, "offline-example", "exec"), ns)   # noqa: S102 - our own documentation
    trainer = ns["trainer"]
    assert trainer.offline_weights and trainer.state.global_step == 2 and trainer.counterfactual_passes == 0
    others = [b for b in _blocks(page.read_text(encoding="utf-8"), "python") if b != example]
    assert others, "docs/export-weights.md: the plain-loop example is gone"
    for i, code in enumerate(others):
        ns = {}
        exec(compile(code, f"export-weights-example-{i}", "exec"), ns)   # noqa: S102
        assert torch.isfinite(ns["loss"]).item()
