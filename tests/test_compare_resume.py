"""compare with ``train: {save_steps: N}``: a cell's training resumes from its last checkpoint, and a
model whose training ended before its evaluations did is evaluated without training again."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from percontrast.commands import compare as C

# A resumed run repeats the uninterrupted one's operations in the same order on one machine
# (restored weights, optimizer, scheduler, RNG, data position and PerCE state), so it is
# bitwise equal there. tests/test_resume.py derives a float64 bound for BLAS kernels whose
# summation order depends on memory alignment: parameters within 1e-9 after 6 steps. A mean NLL
# moves by at most |d NLL / d theta|_1 * 1e-9; the tiny model's gradient 1-norm at these weights
# is below 1e2, so 1e-7 holds, and anything not restored moves parameters by ~lr = 3e-2 (orders
# of magnitude above it).
NLL_TOL = 1e-7


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)     # one reduction order for both runs
    yield
    torch.set_num_threads(n)


def _cfg(out, **train):
    t = {"max_steps": 6, "batch_size": 2, "save_steps": 1, "save_total_limit": 2,
         "eval_data": "builtin:sample-test", "eval_every": 1, "eval_limit": 3, "keep_best": True, **train}
    return C.CompareConfig(model="tiny-random", data="builtin:sample-train", test_data="builtin:sample-test",
                           task="email", k=1, max_length=160, max_new_tokens=3, limit=8, test_limit=4,
                           seeds=[0], methods=["ce", "perce"], learning_rates=[3e-2], dtype="float64",
                           likelihood=True, metrics=["rougeL"], train=t, output_dir=str(out), progress=False)


def _cells(out):
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))}


def _same_cells(got: dict, ref: dict, exact: bool):
    assert set(got) == set(ref)
    for name in ref:
        g, r = got[name], ref[name]
        assert g["config_hash"] == r["config_hash"]
        assert [e["prediction"] for e in g["examples"]] == [e["prediction"] for e in r["examples"]], name
        if not g["trained"]:
            continue
        # the curve's val_nll is rounded to 6 decimals: a difference below NLL_TOL can move one by 1e-6
        assert [s for s, _ in g["train"]["curve"]] == [s for s, _ in r["train"]["curve"]]
        assert [v for _, v in g["train"]["curve"]] == \
            pytest.approx([v for _, v in r["train"]["curve"]], abs=0 if exact else 1e-6 + NLL_TOL)
        assert g["train"]["best_step"] == r["train"]["best_step"]
        for k in ("nll", "rougeL"):
            assert g["metrics"][k] == pytest.approx(r["metrics"][k], abs=0 if exact else NLL_TOL), (name, k)


class _Stop(Exception):
    pass


def _stopped_at_step(monkeypatch, cfg, n: int) -> None:
    """Run compare with the n-th training step (counted over the whole run) raising, as a kill would."""
    from percontrast.trainer import PerCETrainer

    real, calls = PerCETrainer.training_step, []

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == n:
            raise _Stop
        return real(self, *a, **k)

    monkeypatch.setattr(PerCETrainer, "training_step", step)
    with pytest.raises(_Stop):
        C.run(cfg)
    monkeypatch.setattr(PerCETrainer, "training_step", real)


def test_training_stopped_mid_way_resumes_to_the_uninterrupted_cells(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    C.run(_cfg(ref))
    assert not (ref / "_train").exists() or not any((ref / "_train").iterdir())   # removed once written

    out = tmp_path / "run"
    _stopped_at_step(monkeypatch, _cfg(out), 6 + 4)        # ce trains 6 steps, then perce dies in its 4th
    tdir = out / "_train" / "perce__seed0__lr0.03__clip0.8-5"
    assert sorted(p.name for p in tdir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((tdir / C.JOB_FILE).read_text())["train_s"]["3"] > 0
    assert not (out / "cells" / "perce__seed0__lr0.03__clip0.8-5__test.json").exists()

    # --dry-run says how far each model got, and touches nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    plan = C.run(dataclasses.replace(_cfg(out), dry_run=True))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    step3 = json.loads((tdir / C.JOB_FILE).read_text())["train_s"]["3"]
    assert plan["plan"] == ["ce seed 0 lr 0.03: done",
                            f"perce seed 0 lr 0.03 clip 0.8:5: 0 done, 0 reusable, 1 to do; "
                            f"checkpoint at step 3, {step3:.0f} s trained"]
    assert plan["models_to_build"] == 1 and plan["cells_todo"] == 1
    fresh = tmp_path / "fresh"
    assert C.run(dataclasses.replace(_cfg(fresh), dry_run=True))["cells_todo"] == 2
    assert not fresh.exists()

    C.run(_cfg(out))
    got = _cells(out)
    perce = got["perce__seed0__lr0.03__clip0.8-5__test.json"]
    assert perce["train"]["resumed_from_step"] == 3 and perce["train"]["steps"] == 6
    assert "resumed_from_step" not in got["ce__seed0__lr0.03__test.json"]["train"]
    _same_cells(got, _cells(ref), exact=False)
    assert not tdir.exists()


def test_training_of_another_job_is_not_resumed(tmp_path, monkeypatch):
    """A folder left by a job of other settings (here another max_steps) is emptied, not resumed."""
    out = tmp_path / "run"
    _stopped_at_step(monkeypatch, _cfg(out, max_steps=5), 3)
    assert (out / "_train" / "ce__seed0__lr0.03" / "checkpoint-2").is_dir()
    C.run(_cfg(out))
    ce = _cells(out)["ce__seed0__lr0.03__test.json"]
    assert ce["train"]["steps"] == 6 and "resumed_from_step" not in ce["train"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_model_trained_before_its_evaluation_stopped_is_not_trained_again(tmp_path, monkeypatch, lora):
    import percontrast.commands.train as T

    extra = {"lora": True, "lora_r": 4} if lora else {}
    ref = tmp_path / "ref"
    C.run(_cfg(ref, **extra))

    out = tmp_path / "run"
    real_measure, calls = C._measure, []

    def dies_in_perce_eval(cfg, arm, *a, **k):
        if arm == "perce":
            raise _Stop
        return real_measure(cfg, arm, *a, **k)

    monkeypatch.setattr(C, "_measure", dies_in_perce_eval)
    with pytest.raises(_Stop):
        C.run(_cfg(out, **extra))
    monkeypatch.setattr(C, "_measure", real_measure)
    final = out / "_train" / "perce__seed0__lr0.03__clip0.8-5" / C.FINAL
    assert (final / C.FINAL_INFO).is_file()

    real_build = T.build_trainer
    monkeypatch.setattr(T, "build_trainer", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    C.run(_cfg(out, **extra))
    assert calls == []                                   # the saved model, not a new training
    got, want = _cells(out), _cells(ref)
    # the same weights (float64, saved exactly) and the same forwards: the same numbers exactly
    _same_cells(got, want, exact=True)
    name = "perce__seed0__lr0.03__clip0.8-5__test.json"
    assert {k: v for k, v in got[name]["train"].items() if k != "train_s"} == \
        {k: v for k, v in want[name]["train"].items() if k != "train_s"}
    assert not final.parent.exists()


def test_claim_train_dir_keeps_its_own_job_and_empties_another(tmp_path):
    d = tmp_path / "job"
    C.claim_train_dir(d, "a")
    (d / "checkpoint-1").mkdir()
    C.claim_train_dir(d, "a")
    assert (d / "checkpoint-1").is_dir()
    C.claim_train_dir(d, "b")
    assert not (d / "checkpoint-1").exists()
    assert json.loads((d / C.JOB_FILE).read_text()) == {"job": "b"}
    (d / C.JOB_FILE).write_text("{not json")            # a damaged job file is not this job's
    (d / "checkpoint-1").mkdir()
    C.claim_train_dir(d, "b")
    assert not (d / "checkpoint-1").exists()


def test_a_poisoned_checkpoint_is_refused_in_one_line(tmp_path, monkeypatch):
    """As ``train --resume`` (tests/test_security.py): a checkpoint file holding a code-running pickle
    stops the run with one line naming the folder to delete, and its code never runs."""
    from test_security import _assert_poison_is_live, _poison

    from percontrast.errors import UserError

    out = tmp_path / "run"
    _stopped_at_step(monkeypatch, _cfg(out), 3)
    tdir = out / "_train" / "ce__seed0__lr0.03"
    target, marker = tdir / "checkpoint-2" / "rng_state.pth", tmp_path / "pwned"
    _poison(target, marker)
    _assert_poison_is_live(target, marker)
    with pytest.raises(UserError) as e:
        C.run(_cfg(out))
    assert not marker.exists()
    msg = str(e.value)
    assert "Weights only load failed" in msg and f"delete {tdir}" in msg and "\n" not in msg
