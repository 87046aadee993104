"""Several processes (DDP, gloo on CPU) train exactly like one process with the same global batch.

One torchrun launch of 2 CPU processes runs the real CLI (``percontrast.cli.main``) twice:
  a) 2 processes x batch 2                    (global batch 4)
  b) 2 processes x batch 1 x grad_accum 2     (global batch 4)
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

import pytest

from helpers import PY, ROOT, cli_env, load_params, max_param_diff, run_cli, step_losses, write_records

TORCHRUN = shutil.which("torchrun", path=str(ROOT / ".venv" / "bin")) or shutil.which("torchrun")


def _argv(data, out, batch, accum, method="perce"):
    return ["train", "--model", "tiny-random", "--data", str(data), "--task", "generic", "--method", method,
            "--max-steps", "3", "--batch-size", str(batch), "--grad-accum", str(accum), "--max-length", "192",
            "--learning-rate", "3e-3", "--warmup", "0", "--lr-scheduler", "constant", "--no-progress",
            "--clip-min", "0.2", "--clip-max", "5", "--output-dir", str(out)]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_processes_match_one(tmp_path):
    data = write_records(tmp_path / "train.jsonl", n=8)
    ref = tmp_path / "ref"
    runs = {"ddp": (2, 1), "ddp_accum": (1, 2)}
    (tmp_path / "argv.json").write_text(json.dumps(
        [_argv(data, tmp_path / name, batch=b, accum=a) for name, (b, a) in runs.items()]))
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "helpers" / "multi_run.py"),
           str(tmp_path / "argv.json")]
    # Start the 2 processes first and run the 1-process reference meanwhile (start-up is mostly imports).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            cwd=str(ROOT))
    try:
        rc, _, err = run_cli(_argv(data, ref, batch=4, accum=1))
        out, errs = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err
    assert proc.returncode == 0, errs[-4000:]

    ref_losses, ref_params = step_losses(ref), load_params(ref)
    assert len(ref_losses) == 3
    for name in runs:
        out = tmp_path / name
        res = json.loads((out / "train_results.json").read_text())
        assert res["steps"] == 3
        assert step_losses(out) == pytest.approx(ref_losses, abs=1e-5), name
        diff = max_param_diff(load_params(out), ref_params)
        assert diff < 1e-5, f"{name}: parameters differ from one process by {diff:.2e}"
    # The steps must have moved the weights, or equality would prove nothing.
    from percontrast.models import load_model
    init = {k: v.detach() for k, v in load_model("tiny-random")[0].state_dict().items()}
    assert max_param_diff({k: init[k] for k in ref_params}, ref_params) > 1e-3
