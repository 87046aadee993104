"""--keep-best and --early-stopping-patience: the decision rule, the weights kept, resume, 2 processes.

Scripted runs replace ``ValidationCurve._val_nll`` by a list of values, so the step at which training
stops and the step whose weights come back are known in advance. The real-loss runs (float64, plain
SGD at a large learning rate, so val_nll falls and then rises within a few steps) check the same
through the CLI against the ``checkpoint-N`` folders, which hold step N's weights.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, cli_env, load_params, max_param_diff, run_cli, step_losses, write_records
from percontrast.commands.train import (BestSoFar, TrainConfig, ValidationCurve, build_trainer, track_best,
                                        training_outcome)
from percontrast.errors import UserError
from percontrast.models import load_model


def _replay(values, threshold=0.0):
    best, seq = BestSoFar(), []
    for step, v in enumerate(values):
        best = track_best(best, step, v, threshold)
        seq.append(best)
    return seq


def test_track_best_rule():
    seq = _replay([5.0, 4.0, 4.0, 4.5, 3.0, 3.2])
    assert [b.step for b in seq] == [0, 1, 1, 1, 4, 4]        # a tie keeps the earlier evaluation
    assert [b.stale for b in seq] == [0, 0, 1, 2, 0, 1]
    assert seq[-1].val_nll == 3.0
    # NaN never improves; the first finite value after it does
    nan = _replay([math.nan, 5.0])
    assert (nan[0].step, nan[0].stale) == (None, 1) and (nan[1].step, nan[1].stale) == (1, 0)


def test_threshold_counts_improvement_from_the_last_improving_evaluation():
    # steps of 0.06 < threshold 0.1 each: the 2nd one is 0.12 below the reference (5.0) and resets
    seq = _replay([5.0, 4.94, 4.88, 4.85], threshold=0.1)
    assert [b.stale for b in seq] == [0, 1, 0, 1]
    assert [b.step for b in seq] == [0, 1, 2, 3]               # the lowest is tracked regardless of the threshold


def _cfg(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_records(tmp_path / "train.jsonl", n=8)
    ev = write_records(tmp_path / "eval.jsonl", n=4, seed=5)
    base = dict(model="tiny-random", data=str(data), task="generic", max_length=192, batch_size=4, max_steps=6,
                learning_rate=1e-3, progress=False, report=False, save_steps=0, save_total_limit=None,
                eval_data=str(ev), eval_every=1, output_dir=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


class _Callback:
    def __getattr__(self, name):   # every Trainer event not defined below: nothing
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


class _Snapshots(_Callback):
    """Callback: the trainable parameters after every optimizer step, by step."""

    def __init__(self):
        self.at = {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.at[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    on_step_end = on_train_begin


class _NoSave(_Callback):
    """Callback: no checkpoints (in-memory runs, as compare trains)."""

    def on_step_end(self, args, state, control, **kw):
        control.should_save = False

    on_epoch_end = on_step_end


def _scripted(monkeypatch, values):
    it = iter(values)
    monkeypatch.setattr(ValidationCurve, "_val_nll", lambda self, model: next(it))


def _train(cfg, callbacks=()):
    from percontrast.datasets import load_records
    from percontrast.prompts import get_task
    model, tok = load_model("tiny-random")
    torch.manual_seed(cfg.seed)
    trainer, _ = build_trainer(cfg, model, tok, load_records(cfg.data, get_task(cfg.task)),
                               callbacks=[*callbacks, _NoSave()])
    trainer.train()
    return trainer


@pytest.mark.parametrize("lora", [False, True])
def test_keep_best_restores_the_best_evaluation_bitwise(tmp_path, monkeypatch, lora):
    # evaluations at steps 0..4: best at step 2; patience 2 stops at step 4 of 6
    _scripted(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.1])
    snaps = _Snapshots()
    tr = _train(_cfg(tmp_path, keep_best=True, early_stopping_patience=2, lora=lora), [snaps])
    assert tr.state.global_step == 4
    assert training_outcome(tr) == {"best_step": 2, "best_val_nll": 3.0, "stopped_early": True}
    final = {n: p.detach() for n, p in tr.model.named_parameters() if p.requires_grad}
    assert final.keys() == snaps.at[2].keys()
    for n, p in final.items():
        assert torch.equal(p, snaps.at[2][n]), n
    assert any(not torch.equal(snaps.at[2][n], snaps.at[4][n]) for n in final)   # the steps after it moved them


def test_step_zero_is_a_candidate(tmp_path, monkeypatch):
    _scripted(monkeypatch, [1.0, 2.0, 3.0, 4.0])
    snaps = _Snapshots()
    tr = _train(_cfg(tmp_path, keep_best=True, max_steps=3), [snaps])
    assert tr.state.global_step == 3 and training_outcome(tr)["best_step"] == 0
    assert all(torch.equal(p, snaps.at[0][n]) for n, p in tr.model.named_parameters())


def test_keep_best_evaluates_the_last_step(tmp_path, monkeypatch):
    # eval_every 2 over 3 steps: 0, 2 and, with --keep-best, 3 (the best here)
    _scripted(monkeypatch, [5.0, 4.0, 3.0])
    tr = _train(_cfg(tmp_path, keep_best=True, eval_every=2, max_steps=3))
    assert [h["step"] for h in tr.state.log_history if "val_nll" in h] == [0, 2, 3]
    assert training_outcome(tr) == {"best_step": 3, "best_val_nll": 3.0, "stopped_early": False}


def test_early_stopping_alone_keeps_the_last_weights(tmp_path, monkeypatch):
    _scripted(monkeypatch, [5.0, 4.0, 4.0, 4.0])
    snaps = _Snapshots()
    tr = _train(_cfg(tmp_path, early_stopping_patience=2), [snaps])
    assert tr.state.global_step == 3 and training_outcome(tr)["stopped_early"] is True
    assert tr.best_snapshot is None
    assert all(torch.equal(p, snaps.at[3][n]) for n, p in tr.model.named_parameters())


def test_defaults_change_nothing(tmp_path):
    """A curve run with the defaults and one whose patience never runs out train the same weights; the
    default logs nothing new."""
    default = _train(_cfg(tmp_path / "a", max_steps=3))
    patient = _train(_cfg(tmp_path / "b", max_steps=3, early_stopping_patience=100))
    for (n, p), (_, q) in zip(default.model.named_parameters(), patient.model.named_parameters()):
        assert torch.equal(p, q), n
    curve = [(h["step"], h["val_nll"]) for h in default.state.log_history if "val_nll" in h]
    assert curve == [(h["step"], h["val_nll"]) for h in patient.state.log_history if "val_nll" in h]
    assert [s for s, _ in curve] == [0, 1, 2, 3]
    assert [h["step"] for h in default.state.log_history if "loss" in h] == [1, 2, 3]   # evaluating drops no loss log
    assert training_outcome(default) == {}
    assert training_outcome(patient)["stopped_early"] is False


@pytest.mark.parametrize("kw,words", [
    (dict(keep_best=True), "keep_best decides by val_nll"),
    (dict(early_stopping_patience=2), "early_stopping_patience decides by val_nll"),
    (dict(early_stopping_patience=-1, eval_every=1), "early_stopping_patience >= 0"),
    (dict(early_stopping_threshold=0.1, eval_every=1), "only applies with --early-stopping-patience"),
])
def test_config_errors_are_one_line(tmp_path, kw, words):
    kw = {"eval_every": 0, "eval_data": "", **kw}
    if kw["eval_every"]:
        kw["eval_data"] = str(write_records(tmp_path / "e.jsonl", n=2))
    with pytest.raises(UserError) as e:
        TrainConfig(model="tiny-random", data="builtin:sample-train", task="email", **kw)
    assert words in str(e.value) and "\n" not in str(e.value)


def _cli(cfg_dir, data, ev, steps, *extra):
    return ["train", "--model", "tiny-random", "--data", str(data), "--task", "generic", "--method", "perce",
            "--max-steps", str(steps), "--batch-size", "4", "--max-length", "192", "--learning-rate", "10",
            "--warmup", "0", "--lr-scheduler", "constant", "--no-progress", "--no-report", "--clip-min", "0.2",
            "--clip-max", "5", "--dtype", "float64", "--optim", "sgd", "--eval-data", str(ev), "--eval-every", "1",
            "--save-steps", "1", "--save-total-limit", "10", "--output-dir", str(cfg_dir), *extra]


def _curve(ckpt) -> list:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return [(h["step"], h["val_nll"]) for h in state["log_history"] if "val_nll" in h]


def test_keep_best_through_the_cli_and_resume(tmp_path):
    """SGD at lr 10 on float64: val_nll falls, then jumps. The final model is the checkpoint of the
    lowest val_nll, bitwise, also after a --resume from a checkpoint past it (the snapshot is in the
    checkpoint's percontrast_state.pt); a checkpoint of a run without --keep-best is refused."""
    data = write_records(tmp_path / "train.jsonl", n=8)
    ev = write_records(tmp_path / "eval.jsonl", n=4, seed=5)
    out = tmp_path / "run"
    rc, _, err = run_cli(_cli(out, data, ev, 5, "--keep-best"))
    assert rc == 0, err
    curve = _curve(out / "checkpoint-5")
    best = min(curve, key=lambda sv: sv[1])[0]
    assert 0 < best < 5, f"the scenario needs a best step in the middle: {curve}"
    res = json.loads((out / "train_results.json").read_text())
    assert (res["best_step"], res["stopped_early"]) == (best, False)
    assert max_param_diff(load_params(out), load_params(out / f"checkpoint-{best}")) == 0.0
    assert max_param_diff(load_params(out / "checkpoint-5"), load_params(out / f"checkpoint-{best}")) > 0
    # resume past the best: the snapshot comes back from checkpoint-7's state unless a later step beats it
    rc, _, err = run_cli(_cli(out, data, ev, 7, "--keep-best", "--resume"))
    assert rc == 0, err
    curve = _curve(out / "checkpoint-7")
    best = min(curve, key=lambda sv: sv[1])[0]
    assert best < 5, f"the resumed steps must not hold the best for this check: {curve}"
    assert max_param_diff(load_params(out), load_params(out / f"checkpoint-{best}")) == 0.0

    plain = tmp_path / "plain"
    rc, _, err = run_cli(_cli(plain, data, ev, 2))
    assert rc == 0, err
    rc, _, err = run_cli(_cli(plain, data, ev, 3, "--keep-best", "--resume"))
    assert rc == 2 and "holds no snapshot of the best step" in err and len(err.strip().splitlines()) == 1, err


def test_resume_of_a_run_that_stopped_early_is_refused(tmp_path, monkeypatch):
    _scripted(monkeypatch, [5.0, 4.0, 4.5])
    cfg = _cfg(tmp_path, early_stopping_patience=1, save_steps=1)
    from percontrast.commands.train import run
    assert run(cfg)["stopped_early"] is True                     # stopped at step 2, checkpoint-2 saved
    with pytest.raises(UserError, match="already stopped early"):
        run(_cfg(tmp_path, early_stopping_patience=1, save_steps=1, resume=True))


TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_processes_stop_and_keep_like_one(tmp_path):
    """torchrun 2 x batch 2 against 1 x batch 4 (as tests/test_distributed.py, float64, plain SGD): the
    same stop step, the same best step, the same final (restored) weights. lr 3 makes val_nll rise at
    step 3 by ~0.8 nats, far above the ~1e-12 by which the two runs' val_nll can differ, so both must
    decide alike; every rank decides on rank 0's broadcast val_nll, so the ranks cannot disagree."""
    data = write_records(tmp_path / "train.jsonl", n=8)
    ev = write_records(tmp_path / "eval.jsonl", n=4, seed=5)

    def argv(out, batch):
        a = _cli(out, data, ev, 6, "--keep-best", "--early-stopping-patience", "1")
        a[a.index("--batch-size") + 1] = str(batch)
        a[a.index("--learning-rate") + 1] = "3"
        return a

    spec = tmp_path / "two.json"
    spec.write_text(json.dumps([argv(tmp_path / "two", 2)]))
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "helpers" / "multi_run.py"), str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=str(ROOT))
    try:
        rc, _, err = run_cli(argv(tmp_path / "one", 4))
        assert rc == 0, err
        _, perr = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, perr[-4000:]
    assert sorted(p.name for p in tmp_path.glob("two.rank-*")) == ["two.rank-0-of-2", "two.rank-1-of-2"]
    one, two = (json.loads((tmp_path / d / "train_results.json").read_text()) for d in ("one", "two"))
    assert one["stopped_early"] and one["steps"] < 6, one
    assert step_losses(tmp_path / "two") == pytest.approx(step_losses(tmp_path / "one"), rel=1e-6, abs=0)
    assert len(step_losses(tmp_path / "one")) == one["steps"]
    assert [one[k] for k in ("steps", "best_step", "stopped_early")] == \
        [two[k] for k in ("steps", "best_step", "stopped_early")]
    best = one["best_step"]
    assert best < one["steps"]
    ref = load_params(tmp_path / "one")
    assert max_param_diff(ref, load_params(tmp_path / "one" / f"checkpoint-{best}")) == 0.0
    diff = max_param_diff(load_params(tmp_path / "two"), ref)
    print(f"2 processes vs 1: max parameter difference {diff:.2e}")
    assert diff < 1e-9, f"parameters differ from one process by {diff:.2e}"
    # not blind: the weights the stop step left behind are far from the restored ones
    assert max_param_diff(load_params(tmp_path / "one" / f"checkpoint-{one['steps']}"), ref) > 1e-3


def test_keep_best_refuses_sharded_weights():
    """Under FSDP / ZeRO-3 each process holds a shard: a per-process snapshot would be wrong, so one line."""
    from types import SimpleNamespace

    from percontrast.commands.train import _refuse_sharded_keep_best

    def trainer(fsdp=False, zero=None):
        plugin = SimpleNamespace(zero_stage=zero) if zero else None
        return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=zero is not None,
                               accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))

    for t in (trainer(fsdp=True), trainer(zero=3)):
        with pytest.raises(UserError, match="sharded weights"):
            _refuse_sharded_keep_best(t)
    for t in (trainer(), trainer(zero=2)):
        _refuse_sharded_keep_best(t)
