"""Does bf16 autocast make a CPU training step faster, and does it keep PIR and the loss?

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bf16_cpu.py [--rounds 4]

smollm2-135m with LoRA (r 16), one batch of 8 real email records (k 1, max_length 160); a PerCE
training step (E-step + forward + backward, no optimizer step) in float32 and under
``torch.autocast("cpu", dtype=torch.bfloat16)``, alternated in each round so machine load hits both
alike; the ratio is the median over rounds of (bf16 time / float32 time). Then, on the same batch in
eval mode: the largest |PIR difference| and the relative loss difference between the two.

Only CPUs with bf16 matrix units (AMX, e.g. Intel Sapphire Rapids) can be expected to gain; on AVX2
bf16 is emulated. The study uses bf16 only where the ratio is well below 1 AND the PIR difference is
small against the clip floor (0.8 nats): it decides which tokens PerCE up-weights.
Writes benchmarks/results/bf16_cpu.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--data", default=str(ROOT / "data/email-short/train.jsonl"))
    ap.add_argument("--model", default="smollm2-135m", help="model spec (tiny-random for the smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bf16_cpu.md"))
    args = ap.parse_args()

    import torch

    from percontrast.commands.train import TrainConfig, apply_lora
    from percontrast.datasets import load_records
    from percontrast.encoding import PairedCollator
    from percontrast.losses import perce_loss
    from percontrast.pir import token_logprobs
    from percontrast.prompts import get_task
    from percontrast.runinfo import run_info
    from percontrast.scoring import counterfactual_logp, with_profile_logits

    data = args.data if Path(args.data).exists() else "builtin:sample-train"
    cfg = TrainConfig(model=args.model, data=data, task="email", k=1, max_length=160, lora=True, lora_r=16,
                      lora_alpha=32, method="perce")
    model, tok = cfg.load_model()
    model = apply_lora(model, cfg)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:        # LoRA B starts at 0; a trained-looking adapter makes the comparison fair
            p.data.normal_(0, 0.02)
    recs = load_records(data, get_task("email"), limit=8)
    builder = cfg.prompt_builder(tok)
    batch = PairedCollator(tok.pad_token_id)([builder.encode(r) for r in recs])

    def step(bf16: bool):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        model.train()
        with ctx:
            model.eval()
            cf = counterfactual_logp(model, batch)
            model.train()
            logp = token_logprobs(with_profile_logits(model, batch), batch["response_ids"])
            loss = perce_loss(logp, batch["response_mask"], pir=logp.detach() - cf,
                              num_items=int(batch["response_mask"].sum()))
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(False), step(True)      # warm-up
    times = {False: [], True: []}
    load0 = os.getloadavg()
    for r in range(args.rounds):
        for bf16 in ((False, True) if r % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            step(bf16)
            times[bf16].append(time.perf_counter() - t0)
    load1 = os.getloadavg()
    ratio = statistics.median(b / f for f, b in zip(times[False], times[True]))

    model.eval()
    mask = batch["response_mask"].bool()
    out = {}
    for bf16 in (False, True):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            lw = token_logprobs(with_profile_logits(model, batch), batch["response_ids"])
            pir = lw - counterfactual_logp(model, batch)
            loss = perce_loss(lw, batch["response_mask"], pir=pir)
        out[bf16] = (pir.float(), float(loss))
    dpir = (out[True][0] - out[False][0])[mask].abs()
    flips = ((out[True][0] > 0.8) != (out[False][0] > 0.8))[mask].float().mean().item()
    dloss = abs(out[True][1] - out[False][1]) / abs(out[False][1])
    run = run_info(cfg)
    lines = ["# bf16 autocast on CPU: PerCE step time and numbers", "",
             f"Machine: {run.get('machine')}; date {run.get('date')}; torch threads {torch.get_num_threads()}; "
             f"load average {load0[0]:.2f} -> {load1[0]:.2f}; git {run.get('git_commit')}.",
             f"Batch: 8 email records, {int(mask.sum())} response tokens, LoRA r 16, {args.model}.", "",
             f"- step time bf16 / float32: **{ratio:.2f}** (median of {args.rounds} rounds; float32 "
             f"{statistics.median(times[False]):.2f} s, bf16 {statistics.median(times[True]):.2f} s)",
             f"- |PIR bf16 - PIR float32|: max {dpir.max().item():.3f} nats, mean {dpir.mean().item():.4f} nats; "
             f"share of tokens that change side of the 0.8 clip floor: {100 * flips:.2f}%",
             f"- PerCE loss relative difference: {dloss:.2e}", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
