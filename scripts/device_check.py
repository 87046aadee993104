#!/usr/bin/env python3
"""Device check on a CUDA GPU: a few minutes, one summary line per check, exit 1 if any fails.

    python scripts/device_check.py                 # GPU, smollm2-135m
    python scripts/device_check.py --cpu --model tiny-random --steps 2   # smoke test without a GPU

Checks
  env        torch / CUDA / bf16 support.
  fast_fp32  PerCETrainer.compute_loss (the fast path: logits only at response positions, a
             separate no-grad E-step) against a straightforward computation with two full
             forwards and a full log-softmax: loss and gradients, fp32. The clip is opened to
             [-100, 100] so that the weights are PIR itself and every PIR error shows.
  fast_bf16  The same in bf16 weights (looser tolerance).
  train_bf16 A few PerCE steps through the Trainer with --bf16: finite losses, step time.
  memory     Peak GPU memory of those steps (CUDA only).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"CHECK {name:<10} {'PASS' if ok else 'FAIL'}  {detail}", flush=True)


def check(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check
                report(name, False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} "
                       f"({time.perf_counter() - t0:.1f}s)")
                traceback.print_exc(file=sys.stderr)
        return run
    return wrap


def naive_perce(model, batch, clip_min, clip_max):
    """Two full forwards, full log-softmax over every position, then pick the response positions."""
    import torch

    def resp_logp(prefix):
        logits = model(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"],
                       position_ids=batch[prefix + "position_ids"], use_cache=False).logits.float()
        start = int(batch[prefix + "resp_start"]) - 1
        R = batch["response_ids"].shape[1]
        lp = torch.log_softmax(logits[:, start:start + R], dim=-1)
        return lp.gather(-1, batch["response_ids"].unsqueeze(-1)).squeeze(-1)

    logp_with = resp_logp("")
    with torch.no_grad():
        logp_without = resp_logp("cf_")
    mask = batch["response_mask"].float()
    w = (logp_with.detach() - logp_without).clamp(clip_min, clip_max)
    return -(w * logp_with * mask).sum() / mask.sum()


def compare_fast_and_naive(trainer, model, batch, tol_loss, tol_grad):
    import torch
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_items = batch["response_mask"].sum()
    model.zero_grad()
    fast = trainer.compute_loss(model, batch, num_items_in_batch=n_items)
    fast.backward()
    g_fast = [p.grad.detach().float().clone() for p in params]
    model.zero_grad()
    slow = naive_perce(model, batch, trainer.perce.clip_min, trainer.perce.clip_max)
    slow.backward()
    g_slow = [p.grad.detach().float().clone() for p in params]
    model.zero_grad()
    # |loss| can be ~0 (PIR weights of either sign), so the loss tolerance is absolute, scaled by 1 + |loss|.
    d_loss = abs(fast.item() - slow.item()) / (1.0 + abs(slow.item()))
    num = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g_fast, g_slow)))
    den = torch.sqrt(sum((b ** 2).sum() for b in g_slow)).clamp(min=1e-12)
    d_grad = (num / den).item()
    ok = d_loss <= tol_loss and d_grad <= tol_grad and torch.isfinite(fast).item()
    return ok, f"loss {fast.item():.6f} vs {slow.item():.6f} (diff/(1+|loss|) {d_loss:.1e} <= {tol_loss:g}), " \
               f"grad rel L2 diff {d_grad:.1e} <= {tol_grad:g}"


def build(cfg_kwargs, model, tok):
    from percontrast.datasets import load_records
    from percontrast.prompts import get_task
    from percontrast.commands.train import TrainConfig, build_trainer
    cfg = TrainConfig(**cfg_kwargs)
    records = load_records(cfg.data, get_task(cfg.task), limit=cfg.limit)
    trainer, _ = build_trainer(cfg, model, tok, records)
    return trainer


def first_batch(trainer, device):
    import torch
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="Run on CPU (smoke test of this script).")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=5, help="PerCE training steps for train_bf16.")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    from percontrast.models import load_model

    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else True
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    report("env", cuda or args.cpu, f"{name}; torch {torch.__version__}, transformers {transformers.__version__}, "
           f"bf16 {'yes' if bf16_ok else 'no'}" + ("" if cuda or args.cpu else "; no CUDA device (use --cpu)"))
    if not (cuda or args.cpu):
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="percontrast-devcheck-"))
    base = dict(model=args.model, data="builtin:sample-train", task="email", method="perce",
                batch_size=args.batch_size, max_length=args.max_length, max_steps=args.steps, save_steps=0,
                progress=False, output_dir=str(tmp / "run"), overwrite=True, learning_rate=2e-5)

    @check("fast_fp32")
    def fast_fp32():
        model, tok = load_model(args.model, dtype="float32", device=device)
        trainer = build({**base, "clip_min": -100.0, "clip_max": 100.0, "allow_negative_clip": True}, model, tok)
        ok, detail = compare_fast_and_naive(trainer, model, first_batch(trainer, device), 1e-4, 1e-3)
        report("fast_fp32", ok, detail)

    @check("fast_bf16")
    def fast_bf16():
        model, tok = load_model(args.model, dtype="bfloat16", device=device)
        model.to(torch.bfloat16)            # tiny-random ignores dtype
        trainer = build({**base, "clip_min": -100.0, "clip_max": 100.0, "allow_negative_clip": True}, model, tok)
        ok, detail = compare_fast_and_naive(trainer, model, first_batch(trainer, device), 5e-2, 2e-1)
        report("fast_bf16", ok, detail)

    @check("train_bf16")
    def train_bf16():
        model, tok = load_model(args.model, dtype="float32", device=device)
        trainer = build({**base, "bf16": True}, model, tok)
        if cuda:
            import gc
            gc.collect()                       # drop the models of the earlier checks
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        ok = len(losses) == args.steps and all(v == v and abs(v) < float("inf") for v in losses)
        report("train_bf16", ok, f"{trainer.state.global_step} steps, batch {args.batch_size}, {wall / max(args.steps, 1):.2f} "
               f"s/step, losses {', '.join(f'{v:.3f}' for v in losses)}")
        if cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            report("memory", peak < 0.9 * total, f"peak allocated {peak:.2f} GiB of {total:.1f} GiB "
                   f"(reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB)")

    fast_fp32()
    fast_bf16()
    train_bf16()
    failed = [n for n, ok, _ in RESULTS if not ok]
    print(f"SUMMARY {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
