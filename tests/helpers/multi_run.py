"""Run ``percontrast.cli.main`` once per argv list in a JSON file, in this one process.

Launched by torchrun / accelerate launch in test_distributed.py, so that several
distributed configurations share one process start-up (imports dominate on 2 CPU cores).
An argv list may start with ``--inject-nonfinite=IDX``: for that run the E-step returns +inf
for any batch holding example IDX (on whichever rank gets it). ``--inject-per-process-mean``
makes the loss the WRONG normalization (each process divides by its own token count, then
DDP averages over processes), so the parity test can show that it would catch it. Each rank leaves a marker
``<spec>.rank-<RANK>-of-<WORLD_SIZE>`` next to the JSON file, so the test can tell that the
launcher really started several processes. Exits with the first non-zero code.
"""
import json
import os
import sys
from pathlib import Path

import percontrast.trainer as tr
from percontrast.cli import main

REAL = tr.counterfactual_logp
REAL_LOSS = tr.PerCETrainer.compute_loss


def per_process_mean(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    local = inputs["response_mask"].sum()
    loss = REAL_LOSS(self, model, inputs, return_outputs, num_items_in_batch=local)
    # compute_loss multiplies by the process count for the step-wide normalization; undo it
    return loss / self.accelerator.num_processes if not return_outputs else loss


def injecting(bad_idx: int):
    def patched(model, batch):
        lp = REAL(model, batch)
        if bad_idx in batch["idx"].tolist():
            lp = lp.clone()
            lp[:, 0] = float("inf")
        return lp
    return patched


if __name__ == "__main__":
    spec = Path(sys.argv[1])
    for argv in json.loads(spec.read_text()):
        tr.counterfactual_logp = REAL
        tr.PerCETrainer.compute_loss = REAL_LOSS
        if argv and argv[0].startswith("--inject-nonfinite="):
            tr.counterfactual_logp = injecting(int(argv.pop(0).split("=", 1)[1]))
        if argv and argv[0] == "--inject-per-process-mean":
            argv.pop(0)
            tr.PerCETrainer.compute_loss = per_process_mean
        rc = main(argv)
        if rc:
            sys.exit(rc)
    rank, world = os.environ.get("RANK", "none"), os.environ.get("WORLD_SIZE", "none")
    (spec.parent / f"{spec.stem}.rank-{rank}-of-{world}").write_text("ok")
