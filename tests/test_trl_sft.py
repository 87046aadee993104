"""PerCESFTTrainer (percontrast.trl_sft): PerCE inside TRL's SFTTrainer.

(a) on the same batch its loss and gradient are PerCETrainer's, and whole runs end on the same weights;
(b) the completion ids are the same under both prompts, also where the tokenizer merges across the boundary;
(c) what cannot work is refused in one line; (d) 2 processes train like 1; (e) every trainable
parameter learns; (f) the example in docs/trl.md (and README.md, once it has one) runs as written.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import TrainingArguments
from trl import SFTConfig

from helpers import ROOT, cli_env, load_params, max_param_diff, write_records
from percontrast.commands.train import ListDataset
from percontrast.encoding import PairedCollator, PromptBuilder
from percontrast.errors import UserError
from percontrast.models import load_model
from percontrast.options import LossOptions
from percontrast.prompts import counterfactual_prompt, personalized_prompt
from percontrast.trainer import PerCETrainer
from percontrast.trl_sft import PerCESFTConfig, PerCESFTError, PerCESFTTrainer

# Wide clip: the PerCE weights ARE the PIR values, so a wrong E-step changes loss and gradients.
WIDE = dict(clip_min=-50.0, clip_max=50.0, allow_negative_clip=True)


def _config(tmp_path, **kw) -> PerCESFTConfig:
    base = dict(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none",
                per_device_train_batch_size=4, save_strategy="no", logging_steps=1, disable_tqdm=True,
                max_length=None, seed=0, data_seed=0, dataloader_num_workers=0)
    base.update(kw)
    return PerCESFTConfig(**base)


def _tiny64():
    return load_model("tiny-random", dtype="float64")


def _prompt_builder_rows(tok, task, records):
    """PromptBuilder's rows without a chat template, and the same examples as TRL text columns: the
    with-profile prompt, its counterfactual and the profile items, rendered as PromptBuilder renders
    them (its prompt_ids(text) is tokenizer(text + "\\n"), with special tokens; the response is
    tokenized alone, plus EOS)."""
    builder = PromptBuilder(tok, task, k=2, max_length=100_000, use_chat_template=False)
    rows, cols = [], []
    for i, r in enumerate(records):
        items = builder.profile_items(r)
        rows.append(dict(builder.encode(r), idx=i))
        cols.append({"prompt": personalized_prompt(task, items, r["input"]) + "\n",
                     "counterfactual_prompt": counterfactual_prompt(task, r["input"]) + "\n",
                     "bare_prompt": r["input"] + "\n", "profile": items, "completion": r["output"]})
    assert builder.stats.profile_cut == builder.stats.response_cut == 0   # nothing cut: the same text
    return rows, cols


def _text_dataset(cols, column):
    if column == "profile":   # the trainer puts the profile block in front of the bare request
        return Dataset.from_list([{"prompt": c["bare_prompt"], "completion": c["completion"], "profile": c["profile"]}
                                  for c in cols])
    return Dataset.from_list([{k: c[k] for k in ("prompt", "counterfactual_prompt", "completion")} for c in cols])


def _same_rows(trainer, rows):
    got = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    for g, want in zip(got, rows, strict=True):
        for k in ("prompt_with", "prompt_without", "response", "idx"):
            assert g[k] == want[k], k


# -- (a) one implementation ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ce", "perce", "lossce"])
@pytest.mark.parametrize("column", ["profile", "counterfactual_prompt"])
def test_same_batch_same_loss_and_gradient_as_percetrainer(tmp_path, sample_train, email_task, method, column):
    """Exact by construction, tolerance 0: with the same texts, PerCESFTTrainer tokenizes the rows PromptBuilder
    tokenizes (checked), collates them with the same PairedCollator, and both trainers' training_step runs the
    same float64 kernels on the same tensors in the same order (one mixin), so loss and every gradient entry are
    bitwise equal. What could differ is the trainers' own wiring: TRL's fused-LM-head patch of the model's
    forward, its loss scaling flags, its argument defaults."""
    model_a, tok = _tiny64()
    rows, cols = _prompt_builder_rows(tok, email_task, sample_train[:4])
    opts = dict(method=method, **(WIDE if method != "ce" else {}))
    ours = PerCETrainer(model=model_a, args=TrainingArguments(output_dir=str(tmp_path / "ref"), use_cpu=True,
                                                               report_to="none"), perce_args=LossOptions(**opts))
    model_b, _ = _tiny64()
    trl = PerCESFTTrainer(model=model_b, args=_config(tmp_path, task="email", **opts),
                          train_dataset=_text_dataset(cols, column), processing_class=tok)
    _same_rows(trl, rows)
    batch = trl.data_collator([trl.train_dataset[i] for i in range(4)])
    ref_batch = PairedCollator(tok.pad_token_id)(rows)
    assert batch.keys() == ref_batch.keys() and all(torch.equal(batch[k], ref_batch[k]) for k in batch)
    n = int(batch["response_mask"].sum())
    results = []
    for tr, model in ((ours, model_a), (trl, model_b)):
        model.zero_grad(set_to_none=True)
        loss = tr.training_step(model, {k: v.clone() for k, v in batch.items()}, num_items_in_batch=n)
        results.append((loss, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    assert torch.equal(la, lb), (la, lb)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    if method != "ce":   # not blind: the weighted loss is not plain CE on this batch
        from percontrast.losses import ce_loss
        from percontrast.pir import token_logprobs
        from percontrast.scoring import with_profile_logits
        with torch.no_grad():
            ce = ce_loss(token_logprobs(with_profile_logits(model_b, batch), batch["response_ids"]),
                         batch["response_mask"])
        assert abs(lb.item() - ce.item()) > 1e-3


def test_whole_runs_end_on_the_same_weights(tmp_path, sample_train, email_task):
    """3 optimizer steps of 2 x 2 (gradient accumulation), refresh=every_k with k=2 (the per-example cache is used
    on step 2), SGD, float64: both trainers draw the same batches (the same seeded RandomSampler over 4 rows)
    and run the same kernels, so the final weights are bitwise equal (tolerance 0). TRL's default gradient
    checkpointing stays on for PerCESFTTrainer: the recomputed forward is the same kernels on the same inputs."""
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2,
                  lr_scheduler_type="constant", optim="sgd", seed=0, data_seed=0, use_cpu=True, report_to="none",
                  save_strategy="no", disable_tqdm=True, logging_steps=1, dataloader_num_workers=0)
    loss_opts = dict(method="perce", refresh="every_k", refresh_every=2, **WIDE)
    model_a, tok = _tiny64()
    rows, cols = _prompt_builder_rows(tok, email_task, sample_train[:4])
    ours = PerCETrainer(model=model_a, args=TrainingArguments(output_dir=str(tmp_path / "ref"), **common,
                                                               remove_unused_columns=False),
                        train_dataset=ListDataset(rows), data_collator=PairedCollator(tok.pad_token_id),
                        perce_args=LossOptions(**loss_opts))
    ours.train()
    model_b, _ = _tiny64()
    trl = PerCESFTTrainer(model=model_b, args=_config(tmp_path, task="email", **common, **loss_opts),
                          train_dataset=_text_dataset(cols, "profile"), processing_class=tok)
    trl.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model_b.modules())   # TRL's default, on
    assert ours.counterfactual_passes == trl.counterfactual_passes < 6   # the cache really was used
    init = _tiny64()[0]
    moved = 0.0
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
        moved = max(moved, (p - init.get_parameter(n)).abs().max().item())
    assert moved > 1e-6


# -- (b) token alignment -------------------------------------------------------------------------------
def test_completion_ids_are_shared_where_the_tokenizer_merges_across_the_boundary(tmp_path, tiny):
    _, tok = tiny
    prompt, cf, completion = "My city is Lisbon. Where do I live? Answer: ", "Where do I live? Answer: ", "Lisbon"
    # The boundary really merges: tokenized together, the prompt's trailing space joins " Lisbon", so the joint
    # ids do not start with the prompt's own ids (SFTTrainer would train on " Lisbon", text that is partly prompt).
    alone, joint = tok(prompt)["input_ids"], tok(prompt + completion)["input_ids"]
    assert joint[:len(alone)] != alone
    ds = Dataset.from_list([{"prompt": prompt, "counterfactual_prompt": cf, "completion": completion}])
    trl = PerCESFTTrainer(model=load_model("tiny-random")[0], args=_config(tmp_path), train_dataset=ds,
                          processing_class=tok)
    row = trl.train_dataset[0]
    assert row["response"] == tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["prompt_with"] == alone and row["prompt_without"] == tok(cf)["input_ids"]
    assert tok.decode(row["prompt_with"] + row["response"]) == prompt + completion + tok.eos_token   # text kept
    b = trl.data_collator([row])
    R, P, Q = b["response_ids"].shape[1], int(b["resp_start"]), int(b["cf_resp_start"])
    assert torch.equal(b["input_ids"][0, P:P + R], b["response_ids"][0])
    assert torch.equal(b["cf_input_ids"][0, Q:Q + R], b["response_ids"][0])


def test_conversational_completion_is_the_templates_assistant_turn_under_both_prompts(tmp_path, tiny):
    _, tok = tiny
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "Where should we meet? "}],
                             "completion": [{"role": "assistant", "content": "At the Porto market."}],
                             "profile": ["I live in Porto.", "I shop at the market on Saturdays."]}])
    trl = PerCESFTTrainer(model=load_model("tiny-random")[0], args=_config(tmp_path), train_dataset=ds,
                          processing_class=tok)
    row = trl.train_dataset[0]
    # the assistant content and the template's end of turn, tokenized on their own
    assert tok.decode(row["response"]) == "At the Porto market.<|im_end|>\n"
    with_text, without_text = tok.decode(row["prompt_with"]), tok.decode(row["prompt_without"])
    assert "I live in Porto." in with_text and "Porto" not in without_text
    assert with_text.endswith("<|im_start|>assistant\n") and without_text.endswith("<|im_start|>assistant\n")
    b = trl.data_collator([row])
    R, P, Q = b["response_ids"].shape[1], int(b["resp_start"]), int(b["cf_resp_start"])
    assert torch.equal(b["input_ids"][0, P:P + R], b["cf_input_ids"][0, Q:Q + R])


def test_max_length_cuts_the_completion_end_in_both_and_drops_prompts_that_fill_it(tmp_path, tiny, caplog):
    _, tok = tiny
    long = " ".join(["river"] * 40)
    ds = Dataset.from_list([{"prompt": "Say it. ", "counterfactual_prompt": "Say. ", "completion": long},
                            {"prompt": long + " Say it. ", "counterfactual_prompt": "Say. ", "completion": "ok"}])
    with caplog.at_level("WARNING"):
        trl = PerCESFTTrainer(model=load_model("tiny-random")[0], args=_config(tmp_path, max_length=20),
                              train_dataset=ds, processing_class=tok)
    assert len(trl.train_dataset) == 1                       # the row whose prompt fills max_length is gone
    row = trl.train_dataset[0]
    assert len(row["prompt_with"]) + len(row["response"]) == 20
    assert row["response"] == tok(long, add_special_tokens=False)["input_ids"][:len(row["response"])]
    assert "dropped 1/2" in caplog.text and "cut the completion of 1" in caplog.text


# -- (c) refusals ----------------------------------------------------------------------------------------
def _one_line(err: Exception, *words: str) -> None:
    msg = str(err)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("kw,word", [
    (dict(packing=True), "packing"), (dict(padding_free=True), "padding_free"),
    (dict(completion_only_loss=False), "completion_only_loss"), (dict(loss_type="dft"), "loss_type"),
    (dict(assistant_only_loss=True), "assistant_only_loss"), (dict(label_smoothing_factor=0.1), "label_smoothing"),
    (dict(truncation_mode="keep_end"), "truncation_mode"), (dict(pad_to_multiple_of=8), "pad_to_multiple_of"),
    (dict(dataset_kwargs={"skip_prepare_dataset": True}), "skip_prepare_dataset"), (dict(task="nope"), "task"),
])
def test_config_refuses_in_one_line(tmp_path, kw, word):
    with warnings.catch_warnings(), pytest.raises(ValueError) as e:
        warnings.simplefilter("ignore", FutureWarning)   # SFTConfig's own deprecation note on keep_end
        _config(tmp_path, **kw)
    assert isinstance(e.value, PerCESFTError)
    _one_line(e.value, word)


def test_loss_options_are_validated_as_percontrast_validates_them(tmp_path):
    with pytest.raises(UserError) as e:
        _config(tmp_path, clip_min=2.0, clip_max=1.0)
    _one_line(e.value, "clip_min")
    with pytest.raises(UserError) as e:
        _config(tmp_path, clip_min=-1.0)
    _one_line(e.value, "allow-negative-clip")


def _pc(**extra):
    return {"prompt": "Plan my day. ", "completion": "Chess.", **extra}


@pytest.mark.parametrize("rows,words", [
    ([_pc()], ["exactly one", "neither"]),
    ([_pc(profile=["a"], counterfactual_prompt="x")], ["exactly one", "both"]),
    ([{"text": "Plan my day. Chess.", "profile": ["a"]}], ["prompt-completion", "language-modeling"]),
    ([{"messages": [{"role": "user", "content": "hi"}], "profile": ["a"]}], ["prompt-completion", "messages"]),
    ([{"input_ids": [1, 2], "profile": ["a"]}], ["already tokenized"]),
    ([_pc(counterfactual_prompt=[{"role": "user", "content": "x"}])], ["counterfactual_prompt", "string"]),
    ([_pc(profile="I play chess")], ["profile", "list"]),
    ([{"prompt": [{"role": "user", "content": "x"}], "completion": "y", "profile": ["a"]}], ["completion"]),
    ([{"prompt": [{"role": "system", "content": "x"}], "completion": [{"role": "assistant", "content": "y"}],
       "profile": ["a"]}], ["user turn"]),
])
def test_datasets_that_cannot_work_are_refused_in_one_line(tmp_path, tiny, rows, words):
    with pytest.raises(ValueError) as e:
        PerCESFTTrainer(model=load_model("tiny-random")[0], args=_config(tmp_path),
                        train_dataset=Dataset.from_list(rows), processing_class=tiny[1])
    _one_line(e.value, *words)


def test_trainer_arguments_that_cannot_work_are_refused_in_one_line(tmp_path, tiny):
    ds = Dataset.from_list([_pc(profile=["I play chess."])])
    model, tok = load_model("tiny-random")
    cases = [({"data_collator": PairedCollator(0)}, "data_collator"), ({"formatting_func": str}, "formatting_func"),
             ({"compute_metrics": len}, "compute_metrics"),
             ({"args": SFTConfig(str(tmp_path), use_cpu=True)}, "PerCESFTConfig"),
             ({"train_dataset": IterableDataset.from_generator(lambda: iter([_pc(profile=["a"])]))},
              "datasets.Dataset"),
             ({"eval_dataset": Dataset.from_list([_pc()])}, "eval_dataset")]
    for kw, word in cases:
        call = {"model": model, "args": _config(tmp_path), "train_dataset": ds, "processing_class": tok, **kw}
        with pytest.raises(ValueError) as e:
            PerCESFTTrainer(**call)
        _one_line(e.value, word)


def test_the_config_parses_from_the_command_line_like_trls():
    from trl import TrlParser
    (cfg,) = TrlParser(PerCESFTConfig).parse_args_into_dataclasses(
        ["--output_dir", "o", "--use_cpu", "true", "--method", "lossce", "--clip_min", "0.5", "--refresh", "once"])
    assert (cfg.method, cfg.clip_min, cfg.refresh, cfg.clip_max) == ("lossce", 0.5, "once", 5.0)


# -- (d) 2 processes = 1 ---------------------------------------------------------------------------------
BIN = str(Path(sys.executable).parent)
TORCHRUN = shutil.which("torchrun", path=BIN) or shutil.which("torchrun")
# The bound, as in test_distributed.py's docstring: float64 weights and plain SGD, so 1 and 2 processes differ
# only in the order of float64 sums (gloo adds the two processes' gradients, one process sums over its batch):
# < 2 N u sum|terms| with N < 1e4 and sum|terms| < 1e2, i.e. < 1e-10 per gradient entry, and 3 steps at lr
# 3e-3 move a parameter by < 1e-12 more. PARAM_TOL = 1e-9 leaves a margin of ~1000, and the WRONG normalization
# (each process divides by its own token count) must differ from one process by more than 1000 x that.
PARAM_TOL = 1e-9


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_processes_match_one(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "helpers"))
    try:
        from trl_sft_runs import train_run
    finally:
        sys.path.pop(0)
    data = write_records(tmp_path / "train.jsonl", n=8)   # responses of 3 .. 40 words: uneven token counts
    # every_k, k=2, 4 steps = 2 epochs of 2: step 1 computes examples never seen, step 3 reuses PIR cached in
    # epoch 1, possibly by the OTHER rank; the wide clip makes the weights the PIR itself.
    every_k = {"refresh": "every_k", "refresh_every": 2, **WIDE}
    run = {"data": str(data), "batch": 2, "steps": 3}
    runs = [{**run, "out": str(tmp_path / "ddp")}, {**run, "out": str(tmp_path / "wrong"), "wrong_norm": True},
            {**run, "out": str(tmp_path / "ddp_every_k"), "steps": 4, "loss": every_k}]
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "helpers" / "trl_sft_runs.py"), str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=str(ROOT))
    try:
        train_run({**run, "out": str(tmp_path / "one"), "batch": 4})   # the 1-process references, meanwhile
        train_run({**run, "out": str(tmp_path / "one_every_k"), "batch": 4, "steps": 4, "loss": every_k})
        _, err = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    assert sorted(p.name for p in tmp_path.glob("runs.rank-*")) == ["runs.rank-0-of-2", "runs.rank-1-of-2"]

    def params(name):
        return load_params(tmp_path / name)

    one = params("one")
    assert len(json.loads((tmp_path / "one" / "losses.json").read_text())) == 3
    diff = max_param_diff(params("ddp"), one)
    assert diff < PARAM_TOL, f"2 processes differ from 1 by {diff:.2e}"
    diff = max_param_diff(params("ddp_every_k"), params("one_every_k"))
    assert diff < PARAM_TOL, f"every_k: 2 processes differ from 1 by {diff:.2e}"
    wrong = max_param_diff(params("wrong"), one)
    assert wrong > 1000 * PARAM_TOL, f"the per-process mean is invisible at this bound ({wrong:.2e})"
    init = {n: p.detach() for n, p in _tiny64()[0].named_parameters()}
    assert max_param_diff({k: init[k] for k in one}, one) > 1e-4   # the steps moved the weights


# -- (e) every trainable parameter learns ----------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True])
def test_training_moves_every_trainable_parameter(tmp_path, lora):
    model, tok = load_model("tiny-random")
    rows = [{"prompt": [{"role": "user", "content": f"Write a note about {w}."}],
             "completion": [{"role": "assistant", "content": f"{w} with Ana in Lisbon, then figs."}],
             "profile": [{"title": "home", "text": "I live in Lisbon"},
                         {"title": "family", "text": "Ana is my sister"}]}
            for w in ("Saturday", "the market", "chess", "the river")]
    peft_config = None
    if lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = _config(tmp_path, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2 if lora else 3e-3,
                   save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3,
                   method="perce", refresh="once")
    trl = PerCESFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          eval_dataset=Dataset.from_list(rows[:2]), processing_class=tok, peft_config=peft_config)
    before = {n: p.detach().clone() for n, p in trl.model.named_parameters() if p.requires_grad}
    assert before and (not lora or all("lora_" in n for n in before))
    trl.train()
    after = dict(trl.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"parameters that did not move: {unchanged[:5]}"
    logs = [h for h in trl.state.log_history if "loss" in h]
    assert len(logs) == 3 and all({"mean_pir", "mean_weight"} <= set(h) for h in logs)
    assert any(torch.isfinite(torch.tensor(h["eval_loss"])) for h in trl.state.log_history if "eval_loss" in h)
    # an atomic checkpoint that carries the PIR cache (refresh=once: every example's PIR, computed once)
    state = torch.load(tmp_path / "trl" / "checkpoint-3" / "percontrast_state.pt", weights_only=True)
    assert sorted(state["_pir_cache"]) == [0, 1, 2, 3]


# -- (f) the documented example runs ---------------------------------------------------------------------
def _examples(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "PerCESFTTrainer(" in b]


def test_the_documented_example_runs(tmp_path, monkeypatch):
    docs = _examples(ROOT / "docs" / "trl.md")
    assert len(docs) == 1, "docs/trl.md must hold one runnable PerCESFTTrainer example"
    readme = _examples(ROOT / "README.md")
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(docs + readme):
        ns: dict = {}
        exec(compile(code, f"example-{i}", "exec"), ns)   # noqa: S102 - our own documentation
        assert ns["trainer"].state.global_step > 0
