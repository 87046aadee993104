"""Step time and peak memory of one training step: TRL SFT vs ce vs perce (fast, refresh
every step / every 4 steps) vs naive perce, interleaved in ONE process so that machine
drift (other jobs on a shared box) hits every variant alike.

    .venv/bin/python benchmarks/step_time.py             # the full grid (smollm2-135m, B=4, R=128)
    .venv/bin/python benchmarks/step_time.py --quick     # ~2 min on an idle 2-core box (smaller R)
    # on a shared, oversubscribed box: --threads 1 --clock cpu (process CPU time; see NOTES.md)
    # one process per cell group, then: --merge a.json b.json ... --out benchmarks/results/step_time

Setup. Synthetic token sequences (random ids; timing does not depend on the values), all
rows of a batch the same length so no variant pays for padding another does not:
``prompt_with = profile + input`` with the profile a share ``s`` of the whole sequence
``Lc = (input + response) / (1 - s)``, ``prompt_without = input`` (so ``L0 = input + response``).
TRL gets a pre-tokenized dataset whose ``input_ids`` are exactly ``prompt_with + response``
with ``completion_mask`` on the response (checked against the batch its collator builds).

Variants (all share one model and one AdamW per mode; the optimizer step, grad clipping
and zero_grad are the same code for all and are part of the step):
  trl     trl.SFTTrainer.training_step, loss_type "nll", completion_only_loss=True
  ce      PerCETrainer method=ce (fast path)
  perce   PerCETrainer method=perce, refresh=step (E-step every step; the paper)
  perce_k4  refresh=every_k, k=4 (the same batch recurs, so 1 step in 4 runs the E-step:
          its time is reported as the mean over whole 4-step cycles, "amortized")
  naive   PerCETrainer method=perce, fast=False (full logits over both full sequences)
All with gradient checkpointing off and fp32 (TRL's own SFTConfig defaults turn on
gradient checkpointing and bf16; we turn both off so every variant runs the same setup).

Per (mode, share) group: ``warmup`` rounds, then ``steps`` timed rounds; a round runs one
step of each variant in a rotating order. Ratios are taken per round against ``trl`` in
the same round, then median/min/max over rounds. Memory: one extra step per variant under
``torch.profiler(profile_memory=True)``: the peak of tensor bytes allocated by the CPU
allocator during the step above what was live at its start (activations, gradients,
logits, temporaries; not weights or optimizer state, which exist before the step).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("trl", "ce", "perce", "perce_k4", "naive")
LABELS = {"trl": "TRL SFTTrainer (nll, completion-only)", "ce": "ce (ours)", "perce": "perce, refresh every step",
          "perce_k4": "perce, refresh every 4 steps (amortized)", "naive": "perce naive (full logits, 2 full passes)"}


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def lengths(share: float, n_input: int, n_resp: int) -> tuple[int, int]:
    """(profile tokens, Lc) with profile / Lc = share."""
    lc = round((n_input + n_resp) / (1.0 - share))
    return lc - n_input - n_resp, lc


def make_examples(B, share, n_input, n_resp, vocab_hi, seed):
    g = torch.Generator().manual_seed(seed)
    n_prof, _ = lengths(share, n_input, n_resp)
    rows = []
    for i in range(B):
        rnd = lambda n: torch.randint(100, vocab_hi, (n,), generator=g).tolist()  # noqa: E731
        prof, x, y = rnd(n_prof), rnd(n_input), rnd(n_resp)
        rows.append({"prompt_with": prof + x, "prompt_without": x, "response": y, "idx": i})
    return rows


# ----------------------------------------------------------------------------- variants
class Step:
    """One variant: a callable doing one full optimizer step on its fixed batch."""

    def __init__(self, name, trainer, batch, model, opt):
        self.name, self.trainer, self.batch, self.model, self.opt = name, trainer, batch, model, opt
        self.n_items = int((batch["labels"] != -100).sum())
        self.times: list[float] = []        # the metric reported (CPU or wall seconds, see --clock)
        self.wall: list[float] = []
        self.fb: list[float] = []            # CPU s of training_step alone (forward, loss, backward)
        self._last_fb = 0.0

    def __call__(self):
        tr = self.trainer
        c0 = time.process_time()
        loss = tr.training_step(self.model, dict(self.batch), self.n_items)
        self._last_fb = time.process_time() - c0
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        tr.state.global_step += 1
        return float(loss)


def build_steps(model, tok, rows, opt, tmp, variants):
    from datasets import Dataset
    from transformers import TrainingArguments
    from trl import SFTConfig, SFTTrainer

    from percontrast.encoding import PairedCollator
    from percontrast.options import LossOptions
    from percontrast.trainer import PerCETrainer

    ours_batch = PairedCollator(tok.pad_token_id)(copy.deepcopy(rows))
    common = dict(per_device_train_batch_size=len(rows), use_cpu=True, report_to="none", bf16=False,
                  gradient_checkpointing=False, learning_rate=1e-5, disable_tqdm=True, logging_steps=10**6)
    steps = {}
    for v in variants:
        if v == "trl":
            ds = Dataset.from_list([{"input_ids": r["prompt_with"] + r["response"],
                                     "completion_mask": [0] * len(r["prompt_with"]) + [1] * len(r["response"])}
                                    for r in rows])
            cfg = SFTConfig(output_dir=str(tmp / v), completion_only_loss=True, max_length=None,
                            dataset_num_proc=None, **common)
            tr = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
            batch = tr.data_collator([tr.train_dataset[i] for i in range(len(rows))])
            want = ours_batch["input_ids"]                 # same length rows: no padding in either layout
            assert torch.equal(batch["input_ids"], want), "TRL batch differs from ours"
            assert torch.equal(batch["labels"], ours_batch["labels"]), "TRL labels differ from ours"
        else:
            kw = {"ce": dict(method="ce"), "perce": dict(method="perce"),
                  "perce_k4": dict(method="perce", refresh="every_k", refresh_every=4),
                  "naive": dict(method="perce", fast=False)}[v]
            tr = PerCETrainer(model=model, args=TrainingArguments(output_dir=str(tmp / v), **common),
                              perce_args=LossOptions(**kw))
            batch = ours_batch
        steps[v] = Step(v, tr, batch, model, opt)
    return steps


def peak_step_bytes(step: Step) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    mem = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                 key=lambda e: e.start_ns())
    cur = peak = 0
    for e in mem:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def phase_profile(steps: dict, out_rows: list, label: str):
    """One profiled step of perce: time in E-step / with-profile forward+loss / backward /
    optimizer, and the top aten ops by self CPU time."""
    import percontrast.trainer as trainer_mod
    from torch.profiler import ProfilerActivity, profile, record_function

    st = steps["perce"]
    tr = st.trainer
    real_cf, real_cl = trainer_mod.counterfactual_logp, tr.compute_loss

    def cf(m, b):
        with record_function("phase: E-step (profile-free no-grad forward)"):
            return real_cf(m, b)

    def cl(*a, **k):
        with record_function("phase: forward + loss (incl. E-step)"):
            return real_cl(*a, **k)

    trainer_mod.counterfactual_logp, tr.compute_loss = cf, cl
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("phase: whole step"):
                with record_function("phase: training_step (forward, loss, backward)"):
                    tr.training_step(st.model, dict(st.batch), st.n_items)
                with record_function("phase: clip + optimizer + zero_grad"):
                    torch.nn.utils.clip_grad_norm_([p for p in st.model.parameters() if p.requires_grad], 1.0)
                    st.opt.step()
                    st.opt.zero_grad(set_to_none=True)
    finally:
        trainer_mod.counterfactual_logp = real_cf
        del tr.compute_loss
    ka = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 for e in ka if e.key.startswith("phase:")}
    ops = sorted((e for e in ka if not e.key.startswith("phase:")), key=lambda e: -e.self_cpu_time_total)[:8]
    out_rows.append({"group": label, "phases_s": phases,
                     "top_ops": [(e.key, round(e.self_cpu_time_total / 1e6, 3), e.count) for e in ops]})


# ----------------------------------------------------------------------------- main loop
def run_group(model, tok, opt, mode, share, a, tmp, profile_rows):
    rows = make_examples(a.batch, share, a.input, a.response, min(len(tok), 40000), seed=int(share * 100))
    steps = build_steps(model, tok, rows, opt, tmp / f"{mode}-{share}", a.variants)
    names = list(steps)
    for r in range(a.warmup + a.steps):
        order = names[r % len(names):] + names[: r % len(names)]        # rotate: no variant always first
        for v in order:
            w0, c0 = time.perf_counter(), time.process_time()
            steps[v]()
            w, c = time.perf_counter() - w0, time.process_time() - c0
            if r >= a.warmup:
                steps[v].times.append(c if a.clock == "cpu" else w)
                steps[v].wall.append(w)
                steps[v].fb.append(steps[v]._last_fb)
        print(f"  [{mode} share={share}] round {r + 1}/{a.warmup + a.steps} load {load_avg()} "
              + " ".join(f"{v}={steps[v].times[-1]:.2f}s" for v in names if steps[v].times), flush=True)
    mem = {v: peak_step_bytes(steps[v]) for v in names} if a.memory else {}
    if a.profile and "perce" in steps:
        phase_profile(steps, profile_rows, f"{mode} share={share}")
    n_prof, lc = lengths(share, a.input, a.response)
    cell = {"mode": mode, "share": share, "batch": a.batch, "Lc": lc, "L0": a.input + a.response, "variants": {}}
    base = steps.get("trl") or steps["ce"]
    for v in names:
        t = steps[v].times
        per_round = [x / y for x, y in zip(t, base.times)]
        d = {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "mean_s": statistics.fmean(t),
             "times_s": [round(x, 3) for x in t], "wall_s": [round(x, 3) for x in steps[v].wall],
             "fwd_bwd_cpu_s": [round(x, 3) for x in steps[v].fb],
             "ratio_median": statistics.median(per_round),
             "ratio_min": min(per_round), "ratio_max": max(per_round),
             "ratio_of_sums": sum(t) / sum(base.times)}
        if v == "perce_k4":
            d["counterfactual_passes"] = steps[v].trainer.counterfactual_passes
        if mem:
            d["peak_step_mb"] = mem[v] / 2**20
        cell["variants"][v] = d
    cell["baseline"] = base.name
    del steps
    return cell


def fmt_table(cells, a) -> str:
    lines = []
    for mode in a.modes:
        lines += [f"\n### {mode} fine-tune\n" if mode == "full" else "\n### LoRA (r=8, q/k/v/o)\n",
                  "| batch | share | Lc / L0 | variant | step median s (min-max) | ratio to TRL median (min-max) "
                  "| ratio / ce | fwd+bwd ratio / ce | peak step MB | ratio / ce |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in (c for c in cells if c["mode"] == mode):
            V = c["variants"]
            for v, d in V.items():
                amort = v == "perce_k4"
                t = d["mean_s"] if amort else d["median_s"]
                ratio = d["ratio_of_sums"] if amort else d["ratio_median"]
                ce = V.get("ce")
                r_ce = (d["mean_s"] / ce["mean_s"]) if (amort and ce) else \
                    (statistics.median([x / y for x, y in zip(d["times_s"], ce["times_s"])]) if ce else float("nan"))
                fb, fb_ce = d.get("fwd_bwd_cpu_s"), (ce or {}).get("fwd_bwd_cpu_s")
                r_fb = "" if not (fb and fb_ce) else f"{sum(fb) / sum(fb_ce):.3f}" if amort else \
                    f"{statistics.median([x / y for x, y in zip(fb, fb_ce)]):.3f}"
                m = d.get("peak_step_mb")
                m_ce = (m / ce["peak_step_mb"]) if (m is not None and ce and ce.get("peak_step_mb")) else None
                lines.append(
                    f"| {c.get('batch', a.batch)} | {c['share']} | {c['Lc']} / {c['L0']} | {LABELS[v]} | "
                    f"{t:.2f}{' (mean)' if amort else ''} ({d['min_s']:.2f}-{d['max_s']:.2f}) | "
                    f"{ratio:.3f}{' (sum/sum)' if amort else ''} ({d['ratio_min']:.3f}-{d['ratio_max']:.3f}) | "
                    f"{r_ce:.3f} | {r_fb} | {'' if m is None else f'{m:.0f}'} | {'' if m_ce is None else f'{m_ce:.3f}'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--response", type=int, default=128, help="response tokens per example")
    p.add_argument("--input", type=int, default=32, help="task-input tokens (the part both prompts share)")
    p.add_argument("--shares", default="0,0.5,0.75", help="profile share of the with-profile sequence")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed rounds (a multiple of 4 keeps perce_k4 exact)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time per step: wall clock, or the process's CPU time (robust on a shared, "
                        "oversubscribed machine when run with --threads 1)")
    p.add_argument("--merge", nargs="+", help="only merge these result JSONs (one run per cell, run in "
                   "parallel) into --out")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--profile", action="store_true", help="profile one perce step per group (phases + top ops)")
    p.add_argument("--quick", action="store_true", help="~2 min: share 0.5, full only, R=32, 1+4 rounds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_time"))
    a = p.parse_args(argv)
    if a.merge:
        return merge(a)
    if a.quick:
        a.shares, a.modes, a.response, a.input, a.warmup, a.steps = "0.5", "full", 32, 16, 1, 4
    a.shares = [float(s) for s in a.shares.split(",")]
    a.modes = a.modes.split(",")
    a.variants = a.variants.split(",")

    import transformers
    import trl

    from percontrast.models import load_model
    from percontrast.commands.train import TrainConfig, apply_lora

    transformers.logging.set_verbosity_error()
    started = datetime.now(timezone.utc)
    info = {"date_utc": started.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "load_before": load_avg(),
            "args": {k: v for k, v in vars(a).items() if k != "out"}}
    print(f"load before: {info['load_before']}", flush=True)
    cells, profile_rows = [], []
    if a.threads:
        torch.set_num_threads(a.threads)
        info["torch_threads"] = a.threads
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes:
            torch.manual_seed(0)
            model, tok = load_model(a.model)
            if mode == "lora":
                cfg = TrainConfig(model=a.model, data="builtin:sample-train", task="email", lora=True)
                model = apply_lora(model, cfg)
            opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
            for share in a.shares:
                cells.append(run_group(model, tok, opt, mode, share, a, Path(tmp), profile_rows))
                write(a, info, cells, profile_rows, started)       # partial results survive an interrupted run
            del model, opt
    write(a, info, cells, profile_rows, started, final=True)


def merge(a):
    runs = [json.loads(Path(f).read_text()) for f in a.merge]
    cells = [dict(c, batch=c.get("batch", r["info"]["args"]["batch"])) for r in runs for c in r["cells"]]
    cells.sort(key=lambda c: (-c["batch"], -c["share"]))
    prof = [dict(x, group=f"{x['group']}, batch {r['info']['args']['batch']}") for r in runs for x in r["profile"]]
    info = dict(runs[0]["info"])
    info["runs"] = [r["info"] for r in runs]
    info["load_before"] = " | ".join(r["info"]["load_before"] for r in runs)
    info["load_after"] = " | ".join(r["info"]["load_after"] for r in runs)
    args = argparse.Namespace(**{**info["args"], "out": a.out})
    args.modes = [m for m in ("full", "lora") if any(c["mode"] == m for c in cells)]
    info["wall_s"] = max(r["info"]["wall_s"] for r in runs)
    args.batch = "/".join(str(b) for b in sorted({c["batch"] for c in cells}, reverse=True)) + " (column)"
    info["date_utc"] = min(r["info"]["date_utc"] for r in runs)
    render(args, info, cells, prof, final=all(r["info"].get("complete") for r in runs))


def write(a, info, cells, profile_rows, started, final=False):
    info["load_after"] = load_avg()
    info["wall_s"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
    info["complete"] = final
    render(a, info, cells, profile_rows, final)


def render(a, info, cells, profile_rows, final):
    res = {"info": info, "cells": cells, "profile": profile_rows}
    md = [f"# Step time: TRL SFT vs ce vs perce ({a.model}, batch {a.batch}, response {a.response}, "
          f"input {a.input} tokens)\n",
          f"Date {info['date_utc']} UTC, {info['cores']} cores ({info['cpu']}), torch {info['torch']} "
          f"({info['torch_threads']} thread(s)), transformers {info['transformers']}, trl {info['trl']}. "
          f"Load average (1/5/15 min) before {info['load_before']}, after {info['load_after']}; "
          f"wall {info['wall_s']} s{'' if final else ' (PARTIAL: run still going or interrupted)'}. Rounds: {a.warmup} warm-up + {a.steps} timed, variants interleaved.\n",
          f"Times are {'the process CPU time of the step (1 torch thread; robust to other jobs sharing the box)' if a.clock == 'cpu' else 'wall-clock'} seconds; "
          "wall-clock times are in the JSON. " +
          (f"Merged from {len(info['runs'])} runs (one per cell group, run side by side on this machine, "
           f"started {info['date_utc']} UTC; each run interleaves its own variants); load averages are per run. "
           if info.get("runs") else "") +
          "Step = training_step (forward, loss, backward) + grad clip + AdamW step + zero_grad. Ratios are "
          "per round (same round, same machine state), median (min-max) over rounds; perce every-4 uses "
          "sum/sum over whole 4-step cycles. Peak step MB: peak of tensor bytes allocated during one step "
          "above what was live at its start (torch.profiler memory events, CPU allocator).",
          fmt_table(cells, a)]
    if profile_rows:
        md.append("\n### Where a perce step's time goes (torch.profiler, one step)\n")
        for r in profile_rows:
            md.append(f"- {r['group']}: " + ", ".join(f"{k[7:]} {v:.2f}s" for k, v in r["phases_s"].items()))
            md.append("  top ops (self CPU s, calls): " + "; ".join(f"{k} {s} ({n})" for k, s, n in r["top_ops"]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out.with_suffix(".md"), "\n".join(md) + "\n"),
                       (out.with_suffix(".json"), json.dumps(res, indent=2))):
        tmpf = path.with_name(f".{path.name}.tmp")
        tmpf.write_text(text)
        os.replace(tmpf, path)
    if final:
        print("\n".join(md))
    print(f"\nwrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
