"""Several processes (DDP, gloo on CPU) train exactly like one process with the same global batch.

Two launches of 2 CPU processes each run the real CLI (``percontrast.cli.main``):
  a) torchrun, 2 processes x batch 2                                      (global batch 4)
  b) accelerate launch (configs/accelerate/cpu-2proc.yaml), 2 x batch 1 x grad_accum 2 (global batch 4)
and both must match one process x batch 4 (run in-process) step by step (loss) and in the
final parameters (1e-5). Why the global batches hold the same examples: accelerate's seedable
sampler draws the same permutation (data_seed) in every process, and its BatchSamplerShard
hands process p the batches p, p+2, ... of that permutation, so the 2 (or 2x2) micro-batches
of one optimizer step are exactly the 4 examples one process with batch 4 sees. The records
have responses of 3 .. 40 words, so the processes hold uneven numbers of response tokens and a
wrong loss normalization (per-process mean instead of the step's token count) would show.
Dropout: the tiny model has none. 3 steps over 8 records cross an epoch boundary (reshuffle).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, cli_env, load_params, max_param_diff, run_cli, step_losses, write_records

BIN = str(Path(sys.executable).parent)      # the launchers of the environment running the tests
TORCHRUN = shutil.which("torchrun", path=BIN) or shutil.which("torchrun")


def _argv(data, out, batch, accum, method="perce"):
    return ["train", "--model", "tiny-random", "--data", str(data), "--task", "generic", "--method", method,
            "--max-steps", "3", "--batch-size", str(batch), "--grad-accum", str(accum), "--max-length", "192",
            "--learning-rate", "3e-3", "--warmup", "0", "--lr-scheduler", "constant", "--no-progress",
            "--clip-min", "0.2", "--clip-max", "5", "--output-dir", str(out)]


ACCELERATE = shutil.which("accelerate", path=BIN) or shutil.which("accelerate")


@pytest.mark.skipif(TORCHRUN is None or ACCELERATE is None, reason="torchrun / accelerate not installed")
def test_two_processes_match_one(tmp_path):
    data = write_records(tmp_path / "train.jsonl", n=8)
    ref = tmp_path / "ref"
    # a) under torchrun, b) under accelerate launch with the shipped CPU config; both at once.
    launches = {
        "ddp": [TORCHRUN, "--standalone", "--nproc_per_node", "2"],
        "ddp_accum": [ACCELERATE, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"),
                      "--main_process_port", "0"],
    }
    shape = {"ddp": (2, 1), "ddp_accum": (1, 2)}
    procs = {}
    try:
        for name, launcher in launches.items():
            spec = tmp_path / f"{name}.json"
            runs = [_argv(data, tmp_path / name, *shape[name])]
            if name == "ddp":   # + one run where a single rank meets a non-finite weight (see below)
                runs.append(["--inject-nonfinite=5", *_argv(data, tmp_path / "skip", 2, 1), "--on-nonfinite", "skip"])
            spec.write_text(json.dumps(runs))
            procs[name] = subprocess.Popen([*launcher, str(ROOT / "tests" / "helpers" / "multi_run.py"), str(spec)],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           env=cli_env(), cwd=str(ROOT))
        # the 1-process reference runs meanwhile (start-up is mostly imports)
        rc, _, err = run_cli(_argv(data, ref, batch=4, accum=1))
        outs = {name: p.communicate(timeout=420) for name, p in procs.items()}   # a DDP stall ends here
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert rc == 0, err
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}: {outs[name][1][-4000:]}"
        ranks = sorted(f.name.split(".rank-")[1] for f in tmp_path.glob(f"{name}.rank-*"))
        assert ranks == ["0-of-2", "1-of-2"], f"{name}: the launcher did not start 2 processes: {ranks}"

    ref_losses, ref_params = step_losses(ref), load_params(ref)
    assert len(ref_losses) == 3
    for name in launches:
        out = tmp_path / name
        res = json.loads((out / "train_results.json").read_text())
        assert res["steps"] == 3
        assert step_losses(out) == pytest.approx(ref_losses, abs=1e-5), name
        diff = max_param_diff(load_params(out), ref_params)
        assert diff < 1e-5, f"{name}: parameters differ from one process by {diff:.2e}"
    # --on-nonfinite skip with 2 processes: only the rank holding example 5 sees inf, yet both skip
    # that micro-batch together (a lone skip would leave the other rank waiting in DDP's all-reduce).
    skip = json.loads((tmp_path / "skip" / "train_results.json").read_text())
    assert skip["steps"] == 3 and skip["skipped_nonfinite"] >= 1
    assert all(torch.isfinite(v).all() for v in load_params(tmp_path / "skip").values())
    # The steps must have moved the weights, or equality would prove nothing.
    from percontrast.models import load_model
    init = {k: v.detach() for k, v in load_model("tiny-random")[0].state_dict().items()}
    assert max_param_diff({k: init[k] for k in ref_params}, ref_params) > 1e-3


def test_ce_loss_equals_the_stock_trainer(tmp_path):
    """The scaling rules above are the stock Trainer's: with method=ce, PerCETrainer.compute_loss gives
    the stock Trainer's causal-LM loss on the same batch, also when num_items_in_batch is the token
    count of a larger (accumulated / multi-process) step."""
    from transformers import Trainer

    from percontrast.data import load_records
    from percontrast.models import load_model
    from percontrast.prompts import get_task
    from percontrast.train import TrainConfig, build_trainer

    cfg = TrainConfig(model="tiny-random", data=str(write_records(tmp_path / "t.jsonl", n=4)), task="generic",
                      method="ce", batch_size=4, max_length=192, output_dir=str(tmp_path / "o"), progress=False)
    model, tok = load_model("tiny-random")
    trainer, _ = build_trainer(cfg, model, tok, load_records(cfg.data, get_task("generic")))
    batch = next(iter(trainer.get_train_dataloader()))
    n = trainer._get_num_items_in_batch([batch], trainer.args.device)
    assert int(n) == int(batch["response_mask"].sum())
    model.train()
    for items in (n, n * 3):
        ours = trainer.compute_loss(model, batch, num_items_in_batch=items)
        stock_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
        stock = Trainer.compute_loss(trainer, model, stock_inputs, num_items_in_batch=items)
        assert ours.item() == pytest.approx(stock.item(), rel=1e-5)
