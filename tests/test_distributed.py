"""Several processes (DDP, gloo on CPU) train exactly like one process with the same global batch.

Launches of 2 CPU processes each run the real CLI (``percontrast.cli.main``):
  a) torchrun, 2 processes x batch 2                                      (global batch 4)
  b) accelerate launch (configs/accelerate/cpu-2proc.yaml), 2 x batch 1 x grad_accum 2 (global batch 4)
and both must match one process x batch 4 (run in-process) step by step (loss) and in the
final parameters. Why the global batches hold the same examples: accelerate's seedable
sampler draws the same permutation (data_seed) in every process, and its BatchSamplerShard
hands process p the batches p, p+2, ... of that permutation, so the 2 (or 2x2) micro-batches
of one optimizer step are exactly the 4 examples one process with batch 4 sees. The records
have responses of 3 .. 40 words, so the processes hold uneven numbers of response tokens and a
wrong loss normalization (per-process mean instead of the step's token count) would show.
Dropout: the tiny model has none. 3 steps over 8 records cross an epoch boundary (reshuffle).

The bound, derived rather than observed. The runs use float64 weights and plain SGD, so the
only difference between 1 and 2 processes is the order in which float64 sums are formed (gloo
adds the two processes' gradients; one process sums over its batch). A sum of N terms formed
in two orders differs by at most ~2 N u sum|terms| (u = 1.1e-16); here N < 1e4 (tokens x
hidden units per entry) and sum|terms| < 1e2, so a gradient entry moves by < 1e-10, and 3 SGD
steps at lr 3e-3 move a parameter by < 3 * 3e-3 * 1e-10 ~ 1e-12 (plus the same order through
the slightly different weights of steps 2-3, of the same size). PARAM_TOL = 1e-9 leaves a
margin of ~1000. AdamW would not do: it divides each gradient by its own root second
moment, so for a gradient entry near 0 a 1e-16 difference can become a 1e-3 x lr one (the
float32 version of this test failed on another CPU that way).

Not blind: the same launch also runs the WRONG normalization (each process divides by its
own token count, then DDP averages the processes); its parameters must differ from the
one-process run by more than 1000 x PARAM_TOL, and they do by ~1e-5 (printed on failure).
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
ACCELERATE = shutil.which("accelerate", path=BIN) or shutil.which("accelerate")
PARAM_TOL = 1e-9   # derived in the module docstring
# The logged loss passes through the Trainer's float32 accumulator (tr_loss): under 2 processes a
# float32 rounding of each process's loss, their mean and the log's division, at most 4 roundings of
# u32 = 6e-8 relative each against 1 for one process: < 3e-7 relative.
LOSS_RTOL = 1e-6


def _argv(data, out, batch, accum, method="perce", steps=3, *extra):
    return ["train", "--model", "tiny-random", "--data", str(data), "--task", "generic", "--method", method,
            "--max-steps", str(steps), "--batch-size", str(batch), "--grad-accum", str(accum),
            "--max-length", "192", "--learning-rate", "3e-3", "--warmup", "0", "--lr-scheduler", "constant",
            "--no-progress", "--clip-min", "0.2", "--clip-max", "5", "--dtype", "float64", "--optim", "sgd",
            "--output-dir", str(out), *extra]


# refresh=every_k with k=2 over 4 steps (2 epochs of 2 steps): step 1 computes examples never seen,
# step 3 reuses PIR cached in epoch 1 -- possibly computed on the OTHER rank. The weights are the
# PIR itself (wide clip), so a PIR from a different model version changes the update.
EVERY_K = ("--refresh", "every_k", "--refresh-every", "2", "--clip-min", "-50", "--clip-max", "50",
           "--allow-negative-clip", "--save-steps", "1", "--save-total-limit", "4")


def _every_k(data, out, batch, steps=4, *extra):
    return _argv(data, out, batch, 1, "perce", steps, *EVERY_K, *extra)


def _launch(tmp_path, name, launcher, runs):
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(runs))
    return subprocess.Popen([*launcher, str(ROOT / "tests" / "helpers" / "multi_run.py"), str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            cwd=str(ROOT))


def _same_run(out: Path, ref: Path, what: str) -> None:
    res = json.loads((out / "train_results.json").read_text())
    assert res["steps"] == len(step_losses(ref)), what
    assert step_losses(out) == pytest.approx(step_losses(ref), rel=LOSS_RTOL, abs=0), what
    diff = max_param_diff(load_params(out), load_params(ref))
    assert diff < PARAM_TOL, f"{what}: parameters differ from one process by {diff:.2e}"


@pytest.mark.skipif(TORCHRUN is None or ACCELERATE is None, reason="torchrun / accelerate not installed")
def test_two_processes_match_one(tmp_path):
    data = write_records(tmp_path / "train.jsonl", n=8)
    ddp_runs = [
        _argv(data, tmp_path / "ddp", 2, 1),
        ["--inject-per-process-mean", *_argv(data, tmp_path / "wrong_norm", 2, 1)],
        # one rank meets a non-finite weight (see below)
        ["--inject-nonfinite=5", *_argv(data, tmp_path / "skip", 2, 1), "--on-nonfinite", "skip"],
        _every_k(data, tmp_path / "every_k", 2),
        # stopped after the step-2 checkpoint, then resumed: the files a kill right after that
        # checkpoint leaves behind (constant LR, so max_steps does not change the schedule)
        _every_k(data, tmp_path / "every_k_resumed", 2, 2),
        _every_k(data, tmp_path / "every_k_resumed", 2, 4, "--resume"),
        # nextquill divides by its weights' sum, which a micro-batch knows only for itself (losses.
        # weighted_nll, "weights"): 2 processes x batch 2 are 1 process x batch 2 x grad_accum 2
        _argv(data, tmp_path / "nextquill", 2, 1, "nextquill"),
    ]
    accum_cfg = str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml")
    procs = {}
    try:
        procs["ddp"] = _launch(tmp_path, "ddp", [TORCHRUN, "--standalone", "--nproc_per_node", "2"], ddp_runs)
        procs["ddp_accum"] = _launch(tmp_path, "ddp_accum", [ACCELERATE, "launch", "--config_file", accum_cfg,
                                                             "--main_process_port", "0"],
                                     [_argv(data, tmp_path / "ddp_accum", 1, 2)])
        # the 1-process references run meanwhile (start-up is mostly imports)
        for argv in (_argv(data, tmp_path / "ref", 4, 1), _every_k(data, tmp_path / "every_k_ref", 4),
                     _argv(data, tmp_path / "nextquill_ref", 2, 2, "nextquill")):
            rc, _, err = run_cli(argv)
            assert rc == 0, err
        outs = {name: p.communicate(timeout=480) for name, p in procs.items()}   # a DDP stall ends here
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}: {outs[name][1][-4000:]}"
        ranks = sorted(f.name.split(".rank-")[1] for f in tmp_path.glob(f"{name}.rank-*"))
        assert ranks == ["0-of-2", "1-of-2"], f"{name}: the launcher did not start 2 processes: {ranks}"

    ref = tmp_path / "ref"
    assert len(step_losses(ref)) == 3
    _same_run(tmp_path / "ddp", ref, "torchrun 2 x 2")
    _same_run(tmp_path / "ddp_accum", ref, "accelerate 2 x 1 x accum 2")
    wrong = max_param_diff(load_params(tmp_path / "wrong_norm"), load_params(ref))
    assert wrong > 1000 * PARAM_TOL, f"the per-process mean is invisible at this bound ({wrong:.2e})"
    # every_k: ranks run the E-step together and share their cache entries, so 2 processes reuse
    # exactly the PIR one process reuses, also after a resume from rank 0's checkpoint.
    _same_run(tmp_path / "every_k", tmp_path / "every_k_ref", "every_k, 2 processes")
    _same_run(tmp_path / "every_k_resumed", tmp_path / "every_k_ref", "every_k, 2 processes, resumed")
    # nextquill (two with-gradient forwards, a weight-sum normalization): each rank's micro-batch is
    # the one the accumulating process sees at the same place in the step
    _same_run(tmp_path / "nextquill", tmp_path / "nextquill_ref", "nextquill, 2 processes")
    # --on-nonfinite skip with 2 processes: only the rank holding example 5 sees inf, yet both skip
    # that micro-batch together (a lone skip would leave the other rank waiting in DDP's all-reduce).
    skip = json.loads((tmp_path / "skip" / "train_results.json").read_text())
    assert skip["steps"] == 3 and skip["skipped_nonfinite"] >= 1
    assert all(torch.isfinite(v).all() for v in load_params(tmp_path / "skip").values())
    # The steps must have moved the weights, or equality would prove nothing.
    from percontrast.models import load_model
    init = {k: v.detach() for k, v in load_model("tiny-random", dtype="float64")[0].state_dict().items()}
    ref_params = load_params(ref)
    assert max_param_diff({k: init[k] for k in ref_params}, ref_params) > 1e-4


def test_ce_loss_equals_the_stock_trainer(tmp_path):
    """The scaling rules above are the stock Trainer's: with method=ce, PerCETrainer.compute_loss gives
    the stock Trainer's causal-LM loss on the same batch, also when num_items_in_batch is the token
    count of a larger (accumulated / multi-process) step."""
    from transformers import Trainer

    from percontrast.datasets import load_records
    from percontrast.models import load_model
    from percontrast.prompts import get_task
    from percontrast.commands.train import TrainConfig, build_trainer

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
        # float32 on both sides, same per-token terms summed in another order. torch reduces
        # pairwise, so each sum is off by < log2(n) u32 relative: the log-sum-exp over V = 49,152
        # logits < 16 * 6e-8 = 1e-6 (absolute, in a loss of ~10) and the mean over < 256 tokens
        # < 8 * 6e-8 = 5e-7; both together < 2e-7 relative, so 1e-5 is a derived bound.
        assert ours.item() == pytest.approx(stock.item(), rel=1e-5)
