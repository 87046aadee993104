"""Crash-safe checkpoints for ``PerCETrainer``.

``transformers.Trainer._save_checkpoint`` (5.x) writes straight into ``checkpoint-N``: the
weights, then ``optimizer.pt`` / ``scheduler.pt`` / ``rng_state*.pth``, and
``trainer_state.json`` last. A crash in between leaves a ``checkpoint-N`` folder that
``get_last_checkpoint`` picks for ``--resume`` although it is unusable (no optimizer, or no
trainer state, in which case the Trainer silently restarts the step count at 0).

``AtomicCheckpointMixin`` lets the stock code write into a staging folder
``<output_dir>/.checkpoint-staging/checkpoint-N``, fsyncs it, and only then renames it to
``<output_dir>/checkpoint-N`` (a rename within one file system is atomic), so at any
instant every ``checkpoint-N`` is complete and a crash leaves the previous one usable.
Older checkpoints are rotated only after the new one is in place, and each is first renamed
into the staging folder and deleted there: the stock rotation deletes ``checkpoint-N`` in
place, file by file, and a kill in the middle left a visible checkpoint without its
scheduler or optimizer. Besides what the
Trainer saves (weights, optimizer, scheduler, RNG, step = data position), it stores the
trainer's own state named in ``extra_state_attrs`` (PerCE's per-example PIR cache for
``--refresh every_k/once`` and the skipped-step counter) in ``percontrast_state.pt``.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .files import publish_dir

STAGING = ".checkpoint-staging"
EXTRA_STATE = "percontrast_state.pt"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "trainer_state.json"   # the Trainer writes it last


def _checkpoint_dirs(out: str | Path, complete_only: bool) -> list[Path]:
    """``checkpoint-N`` folders of a run, oldest first by step (not by name: 10 after 9)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir()
             if p.is_dir() and (m := _CKPT.match(p.name))
             and (not complete_only or (p / COMPLETE_MARKER).is_file())]
    return [p for _, p in sorted(found)]


def complete_checkpoints(out: str | Path) -> list[Path]:
    """``checkpoint-N`` folders of a run that hold a trainer state, oldest first."""
    return _checkpoint_dirs(out, complete_only=True)


def latest_checkpoint(out: str | Path) -> str | None:
    ckpts = complete_checkpoints(out)
    return str(ckpts[-1]) if ckpts else None


def rotate_checkpoints(run_dir: str | Path, save_total_limit: int | None,
                       best_model_checkpoint: str | None = None) -> list[Path]:
    """Keep the newest ``save_total_limit`` checkpoints (and the best one), as
    ``transformers.trainer_utils.rotate_checkpoints`` with step ordering does, but unpublish
    each old one with a rename into the staging folder before deleting it, so a kill mid-way
    never leaves an incomplete ``checkpoint-N`` in sight. Returns the checkpoints removed."""
    run_dir = Path(run_dir)
    if not save_total_limit or save_total_limit <= 0:
        return []
    ckpts = _checkpoint_dirs(run_dir, complete_only=False)   # as transformers: every checkpoint-N
    if len(ckpts) <= save_total_limit:
        return []
    protected = {ckpts[-1]}                          # the newest, for --resume
    if best_model_checkpoint is not None:
        protected.add(Path(best_model_checkpoint))
    keep = max(save_total_limit, len(protected))
    doomed = [p for p in ckpts if p not in protected][:len(ckpts) - keep]
    trash = run_dir / STAGING
    trash.mkdir(exist_ok=True)
    for p in doomed:
        gone = trash / f"rotated-{p.name}"
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(p, gone)                          # atomic: the checkpoint is gone from sight at once
        shutil.rmtree(gone, ignore_errors=True)
    return doomed


class AtomicCheckpointMixin:
    """Mix in before ``transformers.Trainer``: ``class T(AtomicCheckpointMixin, Trainer)``."""

    extra_state_attrs: tuple[str, ...] = ()
    _staging_root: str | None = None

    def _get_output_dir(self, trial):
        # While a checkpoint is being written the Trainer sees the staging folder as the run
        # folder, so everything it writes (on every rank) lands there.
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        staging = run_dir / STAGING
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)   # leftovers of a crashed save
            staging.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save and self.extra_state_attrs:
                import torch
                torch.save({a: getattr(self, a) for a in self.extra_state_attrs if hasattr(self, a)},
                           staging / name / EXTRA_STATE)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()        # every rank's files are in the staging folder
        if self.args.should_save:
            # the same step saved again (e.g. after a resume) replaces the old folder
            publish_dir(staging / name, run_dir / name, replace=True, fsync=True)
            if self.state.best_model_checkpoint and STAGING in self.state.best_model_checkpoint:
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(
                    os.sep + STAGING, "")
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None and getattr(self, "is_fsdp_enabled", False) and _stateless_sgd(self.optimizer):
            # FSDP2 loads the optimizer with torch's set_optimizer_state_dict, which (torch 2.13) asserts
            # "Expected device to be set" for an optimizer that holds no tensors (SGD without momentum).
            # Such an optimizer has nothing to restore but its learning rate: take it from the scheduler.
            import torch
            self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))
            for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
        else:
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = Path(checkpoint) / EXTRA_STATE
        if path.is_file():
            import torch
            state = torch.load(path, map_location="cpu", weights_only=True)
            for k, v in state.items():
                if k in self.extra_state_attrs:
                    setattr(self, k, v)


def _stateless_sgd(optimizer) -> bool:
    """torch SGD with momentum 0 in every group (under accelerate's wrapper): it keeps no state."""
    import torch
    inner = getattr(optimizer, "optimizer", optimizer)
    return type(inner) is torch.optim.SGD and all(g.get("momentum", 0) == 0 for g in inner.param_groups)
