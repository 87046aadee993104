"""Never lose a run: atomic checkpoints, resume after SIGKILL, --overwrite, non-finite losses."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import PY, ROOT, cli_env, load_params, max_param_diff, run_cli, snapshot, step_losses, write_records

STEPS = 6
# A resumed run repeats the uninterrupted run's operations in the same order (same thread count,
# restored RNG, optimizer, scheduler and PIR cache), so on one machine it is bitwise equal; it is
# measured so here. The bound still allows for BLAS kernels whose summation order depends on memory
# alignment (MKL without CNR mode): in float64 that moves a gradient entry by ~1e-16 relative, which
# AdamW magnifies at most by lr / eps = 3e-3 / 1e-8 for a near-zero gradient: < 1e-10 per step, so
# PARAM_TOL = 1e-9 over 6 steps. Anything not restored (optimizer moments, RNG, data position, the
# PIR cache) moves parameters by ~lr = 3e-3. Logged losses pass the Trainer's float32 accumulator:
# one differently rounded ulp is 1.2e-7 relative.
PARAM_TOL = 1e-9
LOSS_RTOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The subprocess runs use OMP_NUM_THREADS=1; in-process runs must use the same reduction order.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _argv(data, out, *extra):
    return ["train", "--model", "tiny-random", "--data", str(data), "--task", "generic", "--method", "perce",
            "--refresh", "every_k", "--refresh-every", "3", "--clip-min", "0.2",
            "--max-steps", str(STEPS), "--batch-size", "2", "--max-length", "160", "--learning-rate", "3e-3",
            "--dtype", "float64",
            "--save-steps", "1", "--save-total-limit", "2", "--no-progress", "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", n=8)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted run (6 steps over 8 records: crosses an epoch boundary)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    rc, _, err = run_cli(_argv(data, out))
    assert rc == 0, err
    return out


def _assert_same_run(out: Path, ref: Path):
    assert json.loads((out / "train_results.json").read_text())["steps"] == STEPS
    assert step_losses(out) == pytest.approx(step_losses(ref), rel=LOSS_RTOL, abs=0)
    diff = max_param_diff(load_params(out), load_params(ref))
    assert diff <= PARAM_TOL, f"resumed run differs from the uninterrupted one by {diff:.2e}"


def _checkpoint_is_complete(ck: Path):
    for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
              "percontrast_state.pt"):
        assert (ck / f).is_file(), f"{ck.name} lacks {f}"


def test_sigkill_then_resume_matches_uninterrupted(data, reference, tmp_path):
    out = tmp_path / "run"
    seed = int(os.environ.get("PERCONTRAST_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    kill_after = rng.randint(2, STEPS - 2)       # a checkpoint that must exist before the kill
    frac = rng.uniform(0.0, 1.5)                  # then a random moment within the next 1.5 steps
    proc = subprocess.Popen([PY, "-m", "percontrast.cli", *_argv(data, out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=cli_env(), cwd=str(ROOT), text=True)
    seen: dict[int, float] = {}                   # checkpoint step -> when it first appeared
    try:
        deadline = time.monotonic() + 300
        while kill_after not in seen:
            assert proc.poll() is None, f"run ended before the kill (seed {seed}): {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            for p in out.glob("checkpoint-*"):
                seen.setdefault(int(p.name.split("-")[1]), time.monotonic())
            time.sleep(0.01)
        step_time = (seen[kill_after] - seen[1]) / (kill_after - 1) if 1 in seen else 0.5
        time.sleep(frac * step_time)              # often lands mid-step or mid-save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before the kill (seed {seed})"
    assert not (out / "train_results.json").exists()
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts, "no checkpoint survived"
    for ck in ckpts:                              # every published checkpoint is complete
        _checkpoint_is_complete(ck)
    # Without --resume or --overwrite the interrupted run is refused, and left as it is.
    before = snapshot(out)
    rc, _, err = run_cli(_argv(data, out))
    assert rc == 2 and err.startswith("error:") and "--resume" in err
    assert snapshot(out) == before
    rc, stdout, err = run_cli(_argv(data, out, "--resume"))
    assert rc == 0, err
    assert json.loads((out / "train_results.json").read_text())["resumed_from"].endswith(ckpts[-1].name)
    _assert_same_run(out, reference)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(data, reference, tmp_path, monkeypatch):
    """A save that dies half-way (after the weights, before RNG state and trainer state) publishes
    nothing; the previous checkpoint stays usable and the resumed run ends where the reference does."""
    from transformers import Trainer

    out = tmp_path / "run"
    real = Trainer._save_rng_state

    def dying(self, output_dir):
        if self.state.global_step == 3:
            raise OSError("disk full (simulated)")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dying)
    with pytest.raises(OSError, match="simulated"):
        run_cli(_argv(data, out))
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    assert not (out / "checkpoint-3").exists()
    assert (out / ".checkpoint-staging" / "checkpoint-3" / "model.safetensors").exists()  # the half-written one
    _checkpoint_is_complete(out / "checkpoint-2")
    rc, _, err = run_cli(_argv(data, out, "--resume"))
    assert rc == 0, err
    assert not (out / ".checkpoint-staging").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]  # rotated, limit 2
    _assert_same_run(out, reference)


def _fake_checkpoints(run: Path, steps):
    for n in steps:
        ck = run / f"checkpoint-{n}"
        ck.mkdir(parents=True)
        for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                  "percontrast_state.pt"):
            (ck / f).write_text(f)


def test_rotation_killed_mid_delete_leaves_no_incomplete_checkpoint(tmp_path, monkeypatch):
    """The stock rotation deletes checkpoint-N file by file in place; a SIGKILL in the middle (found
    by the test above in CI: 'checkpoint-2 lacks scheduler.pt') left a visible, incomplete checkpoint.
    Ours renames it out of sight first. Here the delete dies after its first file."""
    import shutil as _shutil
    from percontrast import checkpointing

    run = tmp_path / "run"
    _fake_checkpoints(run, [2, 3, 4])
    real = _shutil.rmtree

    def dies_after_one_file(path, *a, **k):
        path = Path(path)
        if path.is_dir() and any(path.iterdir()):
            next(path.iterdir()).unlink()
            raise KeyboardInterrupt("killed mid-delete (simulated)")
        return real(path, *a, **k)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", dies_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.rotate_checkpoints(run, 2)
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    for ck in run.glob("checkpoint-*"):
        _checkpoint_is_complete(ck)


@pytest.mark.parametrize("steps,limit,best", [
    ([1, 2, 3, 4], 2, None), ([1, 2, 3, 4], 2, 1), ([1, 2, 3], 1, 2), ([1, 2, 3], 1, 3), ([5, 10, 40, 100], 3, None),
    ([1, 2], 2, None), ([1, 2, 3], None, None), ([1, 2, 3], 0, None), ([3, 1, 2, 20], 1, None)])
def test_rotation_keeps_what_the_stock_rotation_keeps(tmp_path, steps, limit, best):
    from transformers.trainer_utils import rotate_checkpoints as stock
    from percontrast.checkpointing import rotate_checkpoints as ours

    kept = {}
    for name, fn in (("stock", stock), ("ours", ours)):
        run = tmp_path / name
        _fake_checkpoints(run, steps)
        b = str(run / f"checkpoint-{best}") if best is not None else None
        if name == "stock":
            fn(str(run), save_total_limit=limit, best_model_checkpoint=b, use_mtime=False)
        else:
            fn(run, limit, b)
        kept[name] = sorted(p.name for p in run.glob("checkpoint-*"))
    assert kept["ours"] == kept["stock"]
    assert not any((tmp_path / "ours" / ".checkpoint-staging").glob("rotated-*"))


def test_resume_skips_an_incomplete_checkpoint_folder(data, tmp_path):
    """A checkpoint-N without trainer_state.json (e.g. written by another tool) is never resumed from."""
    from percontrast.checkpointing import latest_checkpoint
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()              # incomplete, higher step
    assert latest_checkpoint(tmp_path).endswith("checkpoint-2")


def test_output_dir_with_a_run_is_not_overwritten(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    before = snapshot(out)
    rc, _, err = run_cli(_argv(data, out))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error:") and str(out) in err and "--overwrite" in err
    assert snapshot(out) == before
    rc, _, err = run_cli(_argv(data, out, "--resume"))     # --resume with no checkpoint: refused too
    assert rc == 2 and err.startswith("error:") and "checkpoint" in err
    assert snapshot(out) == before


def _inject_nonfinite(monkeypatch, bad_idx: int, seen: list):
    """Make the E-step return +inf log-probs for the batch holding example ``bad_idx``."""
    import percontrast.trainer as tr
    real = tr.counterfactual_logp

    def patched(model, batch):
        lp = real(model, batch)
        if bad_idx in batch["idx"].tolist():
            seen.append(batch["idx"].tolist())
            lp = lp.clone()
            lp[:, 0] = float("inf")
        return lp

    monkeypatch.setattr(tr, "counterfactual_logp", patched)


def test_nonfinite_loss_stops_with_step_and_example_ids(data, tmp_path, monkeypatch):
    seen: list = []
    _inject_nonfinite(monkeypatch, 5, seen)
    out = tmp_path / "run"
    rc, _, err = run_cli(_argv(data, out, "--refresh", "step"))
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: non-finite"), err
    assert len(seen) == 1
    ids = [json.loads(line)["id"] for line in data.read_text().splitlines()]
    for i in seen[0]:
        assert repr(ids[i]) in err, err                # every example of the batch is named
    step = int(err.split("at step ")[1].split()[0])
    ckpts = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert ckpts == [] or ckpts[-1] == step - 1          # everything before the bad step is kept
    assert not (out / "train_results.json").exists()


def test_nonfinite_loss_skipped_and_counted(data, tmp_path, monkeypatch):
    seen: list = []
    _inject_nonfinite(monkeypatch, 5, seen)
    out = tmp_path / "run"
    rc, _, err = run_cli(_argv(data, out, "--refresh", "step", "--on-nonfinite", "skip"))
    assert rc == 0, err
    res = json.loads((out / "train_results.json").read_text())
    assert res["steps"] == STEPS
    assert res["skipped_nonfinite"] == len(seen) >= 1
    params = load_params(out)
    assert all(torch.isfinite(v).all() for v in params.values())
    assert all(h["loss"] == h["loss"] for h in res["log"])   # no NaN in the logged losses


def test_huge_learning_rate_stops_the_run(data, tmp_path):
    """No injection: a learning rate of 1e30 drives the weights to inf; the run stops with a clear line."""
    out = tmp_path / "run"
    argv = _argv(data, out, "--refresh", "step", "--save-steps", "0")
    argv[argv.index("--learning-rate") + 1] = "1e30"
    rc, _, err = run_cli(argv)
    assert rc == 2, err
    assert err.count("\n") == 1 and "non-finite" in err and "at step" in err and "for examples" in err
