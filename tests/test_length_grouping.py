"""``train --group-by-length``: the grouped order (``encoding.length_grouped_order``) and how the
Trainer reads it (``commands.train.LengthGroupedDataset``), on 1 and on 2 processes.

Run as a script (``torchrun ... tests/test_length_grouping.py OUT.json ARGV...``) this file is the
2-process worker of ``test_two_processes_split_each_grouped_step_disjointly``: it runs the CLI once
and writes, per rank, the example indices of every micro-batch it trained on.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _rows(lengths):
    """Encoded-example stand-ins: only the lengths matter to the order and to the padding."""
    return [{"prompt_with": [1] * p, "prompt_without": [1] * q, "response": [1] * r} for p, q, r in lengths]


def _study_like_lengths(n, seed=0):
    """Lengths shaped like the email study's (k=1, max_length 256): responses 14..226 tokens and a
    with-profile prompt that gets what the budget leaves (so P and R are anti-correlated), a
    profile-free prompt of 30..75 tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.randint(14, 226)
        q = rng.randint(30, 75)
        p = max(q, min(226, 256 - r - rng.randint(0, 60)))
        out.append((p, q, r))
    return out


def _padding(rows, order, batch):
    """padded / real tokens of the with-profile and the counterfactual pass (aligned layout:
    every row is max prompt + max response wide)."""
    pad = {"with": 0, "cf": 0}
    real = {"with": 0, "cf": 0}
    for a in range(0, len(order), batch):
        b = [rows[i] for i in order[a:a + batch]]
        R = max(len(x["response"]) for x in b)
        for name, key in (("with", "prompt_with"), ("cf", "prompt_without")):
            width = max(len(x[key]) for x in b) + R
            used = sum(len(x[key]) + len(x["response"]) for x in b)
            pad[name] += len(b) * width - used
            real[name] += used
    return {k: pad[k] / real[k] for k in pad}


# -- the order -----------------------------------------------------------------------------------
def test_every_example_once_per_epoch_with_a_short_last_step():
    from percontrast.encoding import length_grouped_order
    rows = _rows(_study_like_lengths(103))          # 25 full steps of 4 and one of 3
    prompt = [len(r["prompt_with"]) for r in rows]
    for epoch in range(3):
        order = length_grouped_order(rows, 4, seed=0, epoch=epoch)
        assert sorted(order) == list(range(103))
        # Each step is 4 neighbours of a run sorted by prompt length, and steps move as units, so every
        # slice the Trainer cuts from the start is sorted; a short step shuffled in among the others
        # would shift every later slice across two steps (and this check fails for such an order).
        steps = [order[a:a + 4] for a in range(0, 103, 4)]
        assert [len(s) for s in steps] == [4] * 25 + [3]
        for s in steps:
            assert [prompt[i] for i in s] == sorted(prompt[i] for i in s), (epoch, s)


def test_order_is_a_function_of_seed_and_epoch():
    from percontrast.encoding import length_grouped_order
    rows = _rows(_study_like_lengths(200))
    a = length_grouped_order(rows, 4, seed=0, epoch=0)
    torch.manual_seed(123)     # the global RNG plays no part (every process must compute the same order)
    assert length_grouped_order(rows, 4, seed=0, epoch=0) == a
    assert length_grouped_order(rows, 4, seed=0, epoch=1) != a        # reshuffled every epoch
    assert length_grouped_order(rows, 4, seed=1, epoch=0) != a
    assert length_grouped_order(rows, 4, seed=1, epoch=0) != length_grouped_order(rows, 4, seed=0, epoch=1)


def test_grouped_batches_pad_far_less_than_random_ones():
    """Measured on the study's email data: 0.32 -> 0.06 (with-profile), 0.34 -> 0.07 (counterfactual).
    On study-shaped lengths grouping must at least halve both, and beat sorting by the one scalar
    prompt+response (which the anti-correlation defeats)."""
    from percontrast.encoding import length_grouped_order
    rows = _rows(_study_like_lengths(1000))
    rnd = _padding(rows, torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist(), 4)
    grp = _padding(rows, length_grouped_order(rows, 4, seed=0), 4)
    total = sorted(range(1000), key=lambda i: len(rows[i]["prompt_with"]) + len(rows[i]["response"]))
    scalar = _padding(rows, total, 4)
    for k in ("with", "cf"):
        assert grp[k] < 0.5 * rnd[k], (grp, rnd)
    assert grp["with"] < scalar["with"], (grp, scalar)


def test_steps_are_spread_over_the_epoch():
    """No long-to-short sweep: the steps' mean response lengths in epoch order are not sorted."""
    from percontrast.encoding import length_grouped_order
    rows = _rows(_study_like_lengths(400))
    order = length_grouped_order(rows, 4, seed=0)
    means = [sum(len(rows[i]["response"]) for i in order[s:s + 4]) / 4 for s in range(0, 400, 4)]
    first_pool = means[:50]
    assert first_pool != sorted(first_pool) and first_pool != sorted(first_pool, reverse=True)
    # Stronger: within one pool (25 steps) the steps are shuffled, so about half the adjacent pairs rise;
    # without the shuffle a pool sorted by response length rises (or falls) at nearly every pair.
    pool = means[:25]
    rises = sum(b > a for a, b in zip(pool, pool[1:])) / (len(pool) - 1)
    assert 0.2 < rises < 0.8, rises


# -- through the Trainer ----------------------------------------------------------------------------
def _cfg(tmp_path, **kw):
    from percontrast.commands.train import TrainConfig
    base = dict(model="tiny-random", data="unused", task="generic", k=2, max_length=192, learning_rate=1e-3,
                batch_size=2, grad_accum=2, output_dir=str(tmp_path / "run"), progress=False, report=False,
                save_steps=0, save_total_limit=None, group_by_length=True, method="ce")
    base.update(kw)
    return TrainConfig(**base)


def _spy_batches(monkeypatch):
    """Record the example indices (``idx``) of every micro-batch the Trainer trains on."""
    import percontrast.trainer as trainer_mod
    seen = []
    real = trainer_mod.PerCETrainer.compute_loss

    def spy(self, model, inputs, *a, **kw):
        seen.append(inputs["idx"].tolist())
        return real(self, model, inputs, *a, **kw)

    monkeypatch.setattr(trainer_mod.PerCETrainer, "compute_loss", spy)
    return seen


def test_default_is_the_trainers_random_sampler(tmp_path, sample_train):
    """Off by default, and then nothing changes: the plain dataset and the Trainer's random sampler
    (so the study's configs, which do not set the option, train on the batches they always did)."""
    from percontrast.commands.train import ListDataset, TrainConfig, build_trainer, training_arguments
    from percontrast.models import load_model
    assert TrainConfig.__dataclass_fields__["group_by_length"].default is False
    cfg = _cfg(tmp_path, group_by_length=False, task="email", max_steps=1)
    assert training_arguments(cfg).train_sampling_strategy == "random"
    model, tok = load_model("tiny-random")
    trainer, _ = build_trainer(cfg, model, tok, sample_train)
    assert type(trainer.train_dataset) is ListDataset


def test_trainer_trains_on_the_grouped_order_and_reshuffles_each_epoch(tmp_path, monkeypatch):
    """9 steps at batch 2 x accumulation 2 over 32 records (8 steps an epoch): the micro-batches are
    the grouped order of epoch 0, then the start of epoch 1's (so the Trainer calls set_epoch on the
    dataset), cut in twos; the global batch the order uses is 4 (batch x accumulation)."""
    from helpers import write_records

    from percontrast.commands.train import LengthGroupedDataset, build_trainer
    from percontrast.datasets import load_records
    from percontrast.encoding import length_grouped_order
    from percontrast.models import load_model
    from percontrast.prompts import get_task

    data = write_records(tmp_path / "t.jsonl", n=32)
    cfg = _cfg(tmp_path, data=str(data), max_steps=9)
    model, tok = load_model("tiny-random")
    seen = _spy_batches(monkeypatch)
    trainer, _ = build_trainer(cfg, model, tok, load_records(cfg.data, get_task("generic")))
    ds = trainer.train_dataset
    assert isinstance(ds, LengthGroupedDataset) and ds.global_batch == 4
    trainer.train()
    want = []
    for epoch in (0, 1):
        order = length_grouped_order(ds.rows, 4, cfg.seed, epoch)
        assert sorted(order) == list(range(32))
        want += [order[i:i + 2] for i in range(0, 32, 2)]
    assert seen == want[:18]
    assert want[16:18] != want[:2]


# -- two processes -----------------------------------------------------------------------------------
# Float64 and plain SGD, as in test_distributed.py, whose module docstring derives the bound: the
# only difference between 1 and 2 processes is the order of float64 sums, < 1e-12 per parameter.
PARAM_TOL = 1e-9


def _argv(data, out, batch, steps):
    return ["train", "--model", "tiny-random", "--data", str(data), "--task", "generic", "--method", "perce",
            "--max-steps", str(steps), "--batch-size", str(batch), "--max-length", "192",
            "--learning-rate", "3e-3", "--lr-scheduler", "constant", "--no-progress", "--no-report",
            "--dtype", "float64", "--optim", "sgd", "--group-by-length", "--output-dir", str(out)]


def test_two_processes_split_each_grouped_step_disjointly(tmp_path, monkeypatch):
    """torchrun 2 x batch 2 against 1 x batch 4, grouped, 9 steps over 32 records (one epoch is 8
    steps, so the second epoch's reshuffle is crossed): in every step the two ranks hold disjoint
    halves of the one-process step, every example is trained on once in epoch 1, and the final
    parameters agree to PARAM_TOL."""
    from helpers import cli_env, load_params, max_param_diff, run_cli, write_records

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        import pytest
        pytest.skip("torchrun not installed")
    data = write_records(tmp_path / "train.jsonl", n=32)
    spec = tmp_path / "ddp.json"
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node", "2", __file__, str(spec),
                             *_argv(data, tmp_path / "ddp", 2, 9)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=str(HERE.parent))
    try:
        seen = _spy_batches(monkeypatch)
        rc, _, err = run_cli(_argv(data, tmp_path / "ref", 4, 9))      # meanwhile, in this process
        assert rc == 0, err
        _, err = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    ranks = [json.loads((tmp_path / f"ddp.json.rank{r}").read_text()) for r in (0, 1)]
    assert len(seen) == len(ranks[0]) == len(ranks[1]) == 9
    for step, (one, a, b) in enumerate(zip(seen, *ranks)):
        assert len(a) == len(b) == 2 and not set(a) & set(b), (step, a, b)
        assert sorted(a + b) == sorted(one), (step, a, b, one)
    assert sorted(i for s in seen[:8] for i in s) == list(range(32))
    diff = max_param_diff(load_params(tmp_path / "ddp"), load_params(tmp_path / "ref"))
    assert diff < PARAM_TOL, f"2 processes differ from one by {diff:.2e}"


def _worker(spec: str, argv: list[str]) -> int:
    """One rank of the 2-process run: the CLI, with every micro-batch's idx written to spec.rankR."""
    import percontrast.trainer as trainer_mod
    from percontrast.cli import main

    seen = []
    real = trainer_mod.PerCETrainer.compute_loss

    def spy(self, model, inputs, *a, **kw):
        seen.append(inputs["idx"].tolist())
        return real(self, model, inputs, *a, **kw)

    trainer_mod.PerCETrainer.compute_loss = spy
    rc = main(argv)
    Path(f"{spec}.rank{os.environ['RANK']}").write_text(json.dumps(seen))
    return rc


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(_worker(sys.argv[1], sys.argv[2:]))
