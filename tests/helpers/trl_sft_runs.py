"""Train ``PerCESFTTrainer`` once per run spec in a JSON file, in this one process.

Launched by torchrun (2 CPU processes, gloo) in test_trl_sft.py, and imported there for the
one-process reference, so both sides run exactly this code. A run spec: ``{"data": jsonl,
"out": dir, "batch": B, "steps": N, "wrong_norm": bool, "loss": {LossOptions overrides}}``. The records
(``helpers.write_records``) become a prompt-completion dataset with a ``profile`` column. The
model is the tiny random one in float64, trained with plain SGD (see the test for why).
``wrong_norm`` makes the loss the WRONG normalization (each process divides by its own token
count, then DDP averages the processes), so the test can show that its bound would catch it.
Rank 0 writes ``<out>/model.safetensors`` and ``<out>/losses.json``; every rank leaves a
marker ``<spec>.rank-<RANK>-of-<WORLD_SIZE>`` so the test can tell 2 processes really ran.
"""
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def dataset_from(path: str):
    from datasets import Dataset
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return Dataset.from_list([{"id": r["id"], "prompt": r["input"], "completion": r["output"],
                               "profile": r["profile"]} for r in rows])


def train_run(spec: dict) -> None:
    from safetensors.torch import save_file

    from percontrast.models import load_model
    from percontrast.trl_sft import PerCESFTConfig, PerCESFTTrainer

    real = PerCESFTTrainer.compute_loss

    def per_process_mean(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        local = inputs["response_mask"].sum()
        loss = real(self, model, inputs, return_outputs, num_items_in_batch=local)
        return loss / self.accelerator.num_processes   # undo the step-wide scaling by the process count

    model, tok = load_model("tiny-random", dtype="float64")
    args = PerCESFTConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
        learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0, optim="sgd", bf16=False,
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=0, data_seed=0, dataloader_num_workers=0, max_length=None,
        **{"method": "perce", "clip_min": 0.2, "clip_max": 5.0, **spec.get("loss", {})})
    PerCESFTTrainer.compute_loss = per_process_mean if spec.get("wrong_norm") else real
    try:
        trainer = PerCESFTTrainer(model=model, args=args, train_dataset=dataset_from(spec["data"]),
                                  processing_class=tok)
        trainer.train()
    finally:
        PerCESFTTrainer.compute_loss = real
    if trainer.accelerator.is_main_process:
        out = Path(spec["out"])
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().clone() for n, p in model.named_parameters()}, str(out / "model.safetensors"))
        (out / "losses.json").write_text(json.dumps([h["loss"] for h in trainer.state.log_history if "loss" in h]))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    spec_file = Path(sys.argv[1])
    for run in json.loads(spec_file.read_text()):
        train_run(run)
    rank, world = os.environ.get("RANK", "none"), os.environ.get("WORLD_SIZE", "none")
    (spec_file.parent / f"{spec_file.stem}.rank-{rank}-of-{world}").write_text("ok")
