"""``percontrast train``: fine-tune with ce / perce / lossce / entce / jsd / threshold, full or LoRA.

    percontrast train --model smollm2-135m --data train.jsonl --task email
        --method perce --clip-min 0.8 --clip-max 5.0 --lora --output-dir runs/perce

The output directory gets checkpoints (``checkpoint-N``, resumable with ``--resume``),
the final model or adapter with its tokenizer, ``train_config.yaml`` and
``train_results.json`` (loss per logged step, mean PIR / weight, wall time, versions; with
``--keep-best`` / ``--early-stopping-patience`` also ``best_step``, ``best_val_nll``, ``stopped_early``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import field
from ..errors import UserError
from ..losses import CONTRAST_METHODS
from ..options import LossOptions, ModelDataOptions


@dataclass
class TrainConfig(ModelDataOptions, LossOptions):
    """Model, data and prompt options (``ModelDataOptions``), the loss (``LossOptions``: method, clip,
    normalize, refresh, declared once and handed to ``PerCETrainer`` as they are) and the optimization."""
    lora: bool = field(False, help="Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = field(8, help="LoRA rank.")
    lora_alpha: int = field(16, help="LoRA alpha.")
    lora_dropout: float = field(0.0, help="LoRA dropout.")
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                           help="Modules that get LoRA adapters.")
    learning_rate: float = field(2e-5, help="Peak learning rate (the paper sweeps 2e-6 .. 5e-5).")
    epochs: float = field(3.0, help="Training epochs (the paper: 3).")
    max_steps: int = field(-1, help="Stop after N optimizer steps (overrides epochs when > 0).")
    batch_size: int = field(4, help="Examples per device per micro-batch.")
    grad_accum: int = field(1, help="Gradient accumulation steps (global batch = batch_size x grad_accum x processes).")
    optim: str = field("adamw_torch", help="Optimizer, by its transformers name (adamw_torch, sgd, adafactor, "
                       "...); plain sgd makes the update linear in the gradient (used by the parity tests).")
    weight_decay: float = field(0.0, help="AdamW weight decay.")
    warmup: float = field(0.0, help="Warm-up: a fraction of training if < 1, else a number of steps.")
    lr_scheduler: str = field("linear", help="transformers scheduler name (linear, cosine, constant, ...).")
    max_grad_norm: float = field(1.0, help="Gradient clipping norm.")
    gradient_checkpointing: bool = field(False, help="Recompute activations in backward to save memory.")
    bf16: bool = field(False, help="bfloat16 mixed precision (GPUs that support it).")
    logging_steps: int = field(1, help="Log every N steps.")
    save_steps: int = field(0, help="Save a checkpoint every N steps (0: only at the end of each epoch).")
    save_total_limit: int | None = field(2, help="Keep at most N checkpoints.")
    output_dir: str = field("runs/train", help="Where checkpoints, the final model and results go.")
    resume: bool = field(False, help="Resume from the latest checkpoint in --output-dir.")
    overwrite: bool = field(False, help="Allow writing into an --output-dir that already holds a run.")
    on_nonfinite: str = field("stop", help="A non-finite loss or weight stops the run (stop) or skips the "
                              "micro-batch and counts it (skip).", choices=("stop", "skip"))
    progress: bool = field(True, help="Show a progress bar and, at every logged step, a line with the step, "
                           "loss and mean PIR on stderr (--no-progress: silent).")
    report: bool = field(True, help="At the end, write report.html with plots of the run into --output-dir "
                         "(percontrast report; a failure there is a warning, the model is saved before).")
    eval_data: str = field("", help="Validation records for a learning curve: every --eval-every steps (and "
                           "at step 0) the NLL per token of their gold responses with the profile is logged as "
                           "val_nll (model in eval mode, no gradient).")
    eval_every: int = field(0, help="Steps between val_nll evaluations (0: none).")
    eval_limit: int = field(32, help="Use the first N --eval-data records for val_nll.")
    keep_best: bool = field(False, help="At the end of training, put back the weights of the evaluation with "
                            "the lowest val_nll (step 0, the untrained model, is a candidate; the earliest wins a "
                            "tie; the last step is evaluated too). Needs --eval-data and --eval-every. The "
                            "snapshot is a CPU copy of the trainable parameters (LoRA: the adapters, a few MB; "
                            "full fine-tuning of a 135M model: ~540 MB in float32), kept in memory and in every "
                            "checkpoint's percontrast_state.pt, so --resume keeps it. The final model in "
                            "--output-dir is the best one; checkpoint-N still holds step N's weights (what "
                            "--resume continues from). Not under FSDP or ZeRO-3 (sharded weights).")
    early_stopping_patience: int = field(0, help="Stop training after N consecutive val_nll evaluations without "
                                         "an improvement (0: off); an evaluation improves when its val_nll is more "
                                         "than --early-stopping-threshold below that of the last evaluation that "
                                         "improved (step 0 is the first). Every process decides on rank 0's "
                                         "val_nll, so all stop at the same step. Needs --eval-data and --eval-every.")
    early_stopping_threshold: float = field(0.0, help="With --early-stopping-patience: how far val_nll (nats per "
                                            "token) must fall to count as an improvement (0: any decrease; val_nll "
                                            "is logged to 6 decimals).")
    group_by_length: bool = field(False, help="Put examples of similar length in the same batch (by response "
                                  "length, then with-profile prompt length, within shuffled pools of 50 steps; "
                                  "the steps in random order; every example once per epoch, the same batches "
                                  "on 1 or N processes for the same global batch). Cuts padding (study email "
                                  "data: padded/real tokens 0.32 -> 0.06) without changing any batch's loss, "
                                  "but changes which examples share a step, so runs differ from the default "
                                  "random batches; see benchmarks/NOTES.md.")

    def __post_init__(self):
        super().__post_init__()
        for name in ("batch_size", "grad_accum", "lora_r", "logging_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise UserError("set epochs > 0 or max_steps > 0")
        if self.eval_every < 0 or self.eval_limit < 1:
            raise UserError("need eval_every >= 0 and eval_limit >= 1")
        if bool(self.eval_data) != (self.eval_every > 0):
            raise UserError("a learning curve needs both --eval-data and --eval-every > 0")
        if self.early_stopping_patience < 0 or self.early_stopping_threshold < 0:
            raise UserError("need early_stopping_patience >= 0 (0: off) and early_stopping_threshold >= 0")
        for name in ("keep_best", "early_stopping_patience"):
            if getattr(self, name) and self.eval_every == 0:
                raise UserError(f"{name} decides by val_nll: give --eval-data and --eval-every > 0")
        if self.early_stopping_threshold and not self.early_stopping_patience:
            raise UserError("early_stopping_threshold only applies with --early-stopping-patience > 0")
        from transformers.training_args import OptimizerNames
        known = [o.value for o in OptimizerNames]
        if self.optim not in known:
            raise UserError(f"optim: unknown optimizer {self.optim!r}; transformers knows: {', '.join(known)}")


class ListDataset:
    """A list of encoded examples as a map-style dataset (the Trainer needs __len__/__getitem__)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class LengthGroupedDataset(ListDataset):
    """``--group-by-length``: the rows in ``encoding.length_grouped_order`` for the current epoch.

    Run with ``train_sampling_strategy="sequential"``: the Trainer then reads positions 0..N-1
    in turn (sharded across processes by accelerate as usual) and this view maps them onto
    the grouped order. The order is changed per epoch through ``set_epoch``, which accelerate's
    DataLoaderShard calls on the dataset when the sampler has none (SequentialSampler has
    none). Done here and not with a custom sampler so PerCETrainer needs no sampler override;
    the stock LengthGroupedSampler takes one length per example, sizes its pools by the
    per-device batch (1 and 2 processes would get different steps) and draws from the global
    RNG, so it does not fit (benchmarks/NOTES.md)."""

    def __init__(self, rows: list[dict], global_batch: int, seed: int):
        super().__init__(rows)
        self.global_batch, self.seed = global_batch, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        from ..encoding import length_grouped_order
        self.epoch = int(epoch)
        self.order = length_grouped_order(self.rows, self.global_batch, self.seed, self.epoch)

    def __getitem__(self, i):
        return self.rows[self.order[i]]


def _is_main_process() -> bool:
    """Global rank 0, or not launched by torchrun / accelerate launch (they set RANK)."""
    import os
    return os.environ.get("RANK", "0") == "0"


def _save_final(trainer, out: Path, main_proc: bool) -> None:
    """save_model into a staging folder, then move each file into ``out`` with os.replace, so a
    crash never leaves a truncated model file there (the checkpoints stay usable either way)."""
    import os
    import shutil
    staging = out / ".final-staging"
    if main_proc:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))      # collective under FSDP / DeepSpeed; rank 0 writes
    trainer.accelerator.wait_for_everyone()
    if main_proc:
        for p in sorted(staging.iterdir()):
            dst = out / p.name
            if p.is_dir() and dst.exists():
                shutil.rmtree(dst)
            os.replace(p, dst)
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def _has_run(out: Path) -> bool:
    return out.exists() and any(out.iterdir())


def apply_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in cfg.lora_target_modules if m not in names]
    if missing:
        raise UserError(f"lora_target_modules: {missing} not found in the model")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def build_trainer(cfg: TrainConfig, model, tokenizer, records: list[dict], *, callbacks=None):
    """Everything up to ``trainer.train()``: encoding, training arguments, the PerCE trainer."""
    from ..encoding import PairedCollator, encode_all
    from ..trainer import PerCETrainer

    builder = cfg.prompt_builder(tokenizer)
    rows = encode_all(builder, records, desc="encoding train")
    if cfg.lora:
        model = apply_lora(model, cfg)
    curve = None
    if cfg.eval_every > 0:
        from ..datasets import load_records
        from ..prompts import get_task
        # a builder of its own, so the prompt-length counters of the run count training records only
        eval_rows = encode_all(cfg.prompt_builder(tokenizer),
                               load_records(cfg.eval_data, get_task(cfg.task), limit=cfg.eval_limit),
                               desc="encoding eval")
        collate = PairedCollator(tokenizer.pad_token_id)
        curve = ValidationCurve([collate(eval_rows[i:i + cfg.batch_size])
                                 for i in range(0, len(eval_rows), cfg.batch_size)], cfg.eval_every,
                                keep_best=cfg.keep_best, patience=cfg.early_stopping_patience,
                                threshold=cfg.early_stopping_threshold)
        callbacks = list(callbacks or []) + [curve]
    args = training_arguments(cfg)
    if cfg.group_by_length:   # one optimizer step's examples: batch x accumulation x processes
        global_batch = args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        dataset = LengthGroupedDataset(rows, global_batch, cfg.seed)
    else:
        dataset = ListDataset(rows)
    trainer = PerCETrainer(model=model, args=args, train_dataset=dataset,
                           data_collator=PairedCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                           perce_args=cfg, example_ids=[r["id"] for r in records], callbacks=callbacks)
    if curve is not None:
        curve.trainer = trainer
        if cfg.keep_best:
            _refuse_sharded_keep_best(trainer)
    _progress_display(trainer, cfg.progress)
    _warn_fsdp_dropped(trainer)
    return trainer, builder


def _warn_fsdp_dropped(trainer) -> None:
    """accelerate 1.15 makes an FSDP launch FSDP only on GPU-like devices; on CPU it drops the plugin
    without a word and the Trainer uses DDP (docs/scaling.md). Say so, once, on rank 0."""
    import os
    import sys
    if (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not trainer.is_fsdp_enabled
            and _is_main_process()):
        print("warning: this launch asks for FSDP, but accelerate runs FSDP only on GPUs: on CPU it trains "
              "with DDP (every process holds the whole model); see docs/scaling.md", file=sys.stderr)


@dataclass(frozen=True)
class BestSoFar:
    """What early stopping and --keep-best know after the val_nll evaluations so far."""
    step: int | None = None      # the evaluation with the lowest val_nll (the earliest on a tie)
    val_nll: float = math.inf
    ref: float = math.inf        # val_nll of the last evaluation that improved by more than the threshold
    stale: int = 0               # evaluations since that one


def track_best(best: BestSoFar, step: int, val_nll: float, threshold: float = 0.0) -> BestSoFar:
    """``best`` after one more evaluation. The lowest val_nll is kept apart from the patience reference
    so a threshold never hides the lowest point from --keep-best; a NaN never improves anything."""
    lowest = val_nll < best.val_nll
    improved = val_nll < best.ref - threshold
    return BestSoFar(step if lowest else best.step, val_nll if lowest else best.val_nll,
                     val_nll if improved else best.ref, 0 if improved else best.stale + 1)


def trainable_snapshot(model) -> dict:
    """A detached CPU copy of the trainable parameters, by name (what --keep-best keeps)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model, params: dict) -> None:
    """Copy ``trainable_snapshot``'s tensors back into the model's parameters, in place."""
    import torch

    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if own.keys() != params.keys():
        raise UserError("--keep-best: the saved best weights do not match this model's trainable parameters "
                        "(another --lora setting than the checkpoint's run?)")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(params[n])


def _refuse_sharded_keep_best(trainer) -> None:
    """Each process would snapshot only its shard, and rank 0 would checkpoint only its own."""
    ds = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and ds is not None and ds.zero_stage == 3):
        raise UserError("--keep-best does not work with sharded weights (FSDP, DeepSpeed ZeRO-3); "
                        "train with DDP or ZeRO-1/2, or drop --keep-best")


class ValidationCurve:
    """Trainer callback: log ``val_nll`` (NLL per token of the validation gold responses, with the
    profile, eval mode, no gradient) at step 0 and every ``every`` optimizer steps.

    Every process evaluates all batches on its own replica; rank 0's sums are then broadcast, so
    ``log_history`` and the decisions below are the same on every process even where replicas'
    floating-point results could differ. With ``keep_best`` / ``patience`` it also tracks the best
    evaluation (``track_best``), snapshots its weights into ``trainer.best_snapshot`` (checkpointed
    with the PerCE state), stops training after ``patience`` evaluations without improvement, puts
    the best weights back at the end and logs ``best_step``, ``best_val_nll`` and ``stopped_early``.
    On ``--resume`` the tracking is replayed from the checkpoint's ``log_history``; the snapshot
    comes from its ``percontrast_state.pt`` and must be the one of the replayed best step."""

    def __init__(self, batches: list[dict], every: int, keep_best: bool = False, patience: int = 0,
                 threshold: float = 0.0):
        self.batches, self.every, self.trainer = batches, every, None
        self.keep_best, self.patience, self.threshold = keep_best, patience, threshold
        self.tracking = keep_best or patience > 0
        self.best, self.stopped_early = BestSoFar(), False

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def _val_nll(self, model) -> float:
        from ..scoring import response_nll
        from ..trainer import eval_mode

        device = next(model.parameters()).device
        total = count = 0.0
        with eval_mode(model):
            for b in self.batches:
                s, n = response_nll(model, {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()})
                total, count = total + s, count + n
        acc = self.trainer.accelerator
        if acc.num_processes > 1:
            import torch
            from accelerate.utils import broadcast
            total, count = broadcast(torch.tensor([total, count], dtype=torch.float64, device=acc.device)).tolist()
        return round(total / max(count, 1.0), 6)

    def _evaluate(self, state, control, model) -> None:
        val = self._val_nll(model)
        self._log({"val_nll": val}, control)
        if not self.tracking:
            return
        # Not state.best_metric / best_global_step: the Trainer would then protect and prune checkpoints
        # by them; the val_nll entries of log_history (restored on --resume) say all there is.
        self.best = track_best(self.best, state.global_step, val, self.threshold)
        if self.keep_best and self.best.step == state.global_step:
            self.trainer.best_snapshot = {"step": state.global_step, "val_nll": val,
                                          "params": trainable_snapshot(self.trainer.model)}
        if self.patience and self.best.stale >= self.patience:
            control.should_training_stop = True
            self.stopped_early = state.global_step < state.max_steps

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.best, self.stopped_early = BestSoFar(), False
        if not self.keep_best:
            self.trainer.best_snapshot = None    # one a resumed checkpoint held is not ours to carry on
        if self.tracking:
            self._resume(state)
        if state.global_step == 0:
            self._evaluate(state, control, model)

    def _resume(self, state) -> None:
        """Replay the evaluations a resumed checkpoint logged (none on a fresh run) and check its snapshot."""
        for h in state.log_history:
            if "val_nll" in h:
                self.best = track_best(self.best, h["step"], h["val_nll"], self.threshold)
        if state.global_step == 0:
            return
        if self.patience and self.best.stale >= self.patience:
            raise UserError(f"--resume: this run already stopped early (no val_nll improvement in "
                            f"{self.best.stale} evaluations); raise --early-stopping-patience to train on")
        snap = self.trainer.best_snapshot
        if self.keep_best and (snap is None or snap["step"] != self.best.step):
            raise UserError(f"--keep-best: the checkpoint at step {state.global_step} holds no snapshot of the "
                            f"best step ({self.best.step}); its run had no --keep-best. Resume without "
                            "--keep-best, or train again from the start")

    def on_step_end(self, args, state, control, model=None, **kw):
        # --keep-best also evaluates the last step, so no trained step is thrown away unseen
        if state.global_step % self.every == 0 or (self.keep_best and state.global_step >= state.max_steps):
            self._evaluate(state, control, model)

    def on_train_end(self, args, state, control, **kw):
        if not self.tracking:
            return
        if self.keep_best and self.trainer.best_snapshot is not None:
            restore_trainable(self.trainer.model, self.trainer.best_snapshot["params"])
        self._log({"best_step": self.best.step,
                   "best_val_nll": self.best.val_nll if self.best.step is not None else None,
                   "stopped_early": self.stopped_early}, control)

    def _log(self, logs: dict, control) -> None:
        # Trainer.log clears control.should_log: from on_step_end that dropped the step's training loss
        should_log = control.should_log
        self.trainer.log(logs)
        control.should_log = should_log


def training_outcome(trainer) -> dict:
    """``best_step``, ``best_val_nll``, ``stopped_early`` of a run with --keep-best or early stopping
    (the last such entry of ``log_history``); {} without them."""
    for h in reversed(trainer.state.log_history):
        if "best_step" in h:
            return {k: h[k] for k in ("best_step", "best_val_nll", "stopped_early")}
    return {}


def _progress_display(trainer, progress: bool) -> None:
    """The Trainer prints each log as a raw dict (with its tqdm bar, or on stdout without it).
    Instead: with ``progress``, a step bar plus one compact line per logged step
    (``ProgressLineCallback(bar=True)``); without, nothing (a ``ProgressLineCallback()`` the
    caller passed in ``callbacks`` still prints its lines, e.g. the demo's)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .report import ProgressLineCallback

    handler = trainer.callback_handler
    for cb in list(handler.callbacks):
        if isinstance(cb, (ProgressCallback, PrinterCallback)) or type(cb).__name__ == "NotebookProgressCallback":
            trainer.remove_callback(cb)
    if progress:
        theirs = [cb for cb in handler.callbacks if isinstance(cb, ProgressLineCallback)]
        for cb in theirs:   # one line per log, not two
            trainer.remove_callback(cb)
        trainer.add_callback(ProgressLineCallback(bar=True))


def _write_report(out: Path) -> str | None:
    """report.html of the finished run; any failure is one warning line (the model and
    train_results.json are already saved, and ``percontrast report`` can be rerun)."""
    import sys

    from .report import ReportConfig
    from .report import run as write_report
    try:
        return write_report(ReportConfig(run_dir=str(out)))["report"]
    except Exception as e:  # noqa: BLE001 - a report must never cost the trained model
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"warning: report.html not written ({type(e).__name__}: {first}); the model and "
              f"train_results.json are saved; rerun: percontrast report {out}", file=sys.stderr)
        return None


def training_arguments(cfg: TrainConfig):
    """The ``transformers.TrainingArguments`` this config describes."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup, lr_scheduler_type=cfg.lr_scheduler, max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps > 0 else "epoch",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500, save_total_limit=cfg.save_total_limit,
        seed=cfg.seed, data_seed=cfg.seed, bf16=cfg.bf16, use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=cfg.gradient_checkpointing, remove_unused_columns=False,
        report_to="none", disable_tqdm=not cfg.progress, dataloader_num_workers=0,
        optim=cfg.optim, logging_first_step=True,
        # grouped: LengthGroupedDataset already holds the epoch's (seeded) order; read it in turn
        train_sampling_strategy="sequential" if cfg.group_by_length else "random")


def run(cfg: TrainConfig) -> dict:
    import transformers

    from ..checkpointing import latest_checkpoint
    from ..datasets import load_records
    from ..files import write_text_atomic
    from ..prompts import get_task
    from ..runinfo import run_info

    out = Path(cfg.output_dir)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise UserError(f"--resume: no checkpoint-* folder in {out}")
    # Under torchrun / accelerate launch only rank 0 checks and writes: another rank would see
    # rank 0's first files and refuse its own run (the launcher stops all ranks when rank 0 fails).
    main_proc = _is_main_process()
    if main_proc and not cfg.resume and _has_run(out) and not cfg.overwrite:
        raise UserError(f"output dir {out} already holds a run; pass --resume to continue it or --overwrite")
    records = load_records(cfg.data, get_task(cfg.task), limit=cfg.limit)
    transformers.set_seed(cfg.seed)
    model, tok = cfg.load_model()
    trainer, builder = build_trainer(cfg, model, tok, records)
    out.mkdir(parents=True, exist_ok=True)
    import yaml
    if main_proc:
        write_text_atomic(out / "train_config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    t0 = time.perf_counter()
    from pickle import UnpicklingError
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except UnpicklingError as e:   # a checkpoint file that is not plain tensors: refused, never run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--resume: {resume_from} holds a file that is not plain tensors and was refused "
                        f"without running it (tampered with?): {first[:200]}") from None
    wall = time.perf_counter() - t0
    _save_final(trainer, out, main_proc)  # final weights (or LoRA adapter) + tokenizer
    logs = [h for h in trainer.state.log_history if "loss" in h]
    summary = {
        "method": cfg.method, "refresh": cfg.refresh if cfg.method in CONTRAST_METHODS else None,
        "steps": trainer.state.global_step, "train_loss": result.training_loss, "wall_s": round(wall, 2),
        "examples": len(records), **builder.stats.counts(), "skipped_nonfinite": trainer.skipped_nonfinite,
        "resumed_from": resume_from, "log": logs, **training_outcome(trainer), "run": run_info(cfg),
    }
    if main_proc:
        write_text_atomic(out / "train_results.json", json.dumps(summary, indent=2, default=str))
        if cfg.report:
            summary = {**summary, "report": _write_report(out)}
    return summary

