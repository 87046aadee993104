"""Training cost per step at the study's real shapes: how much of a step is padding (random vs
length-grouped batches), this CPU's float32 matmul peak, the achieved FLOP/s of a step, and
perce / ce step time, interleaved in ONE process.

    .venv/bin/python benchmarks/train_cost.py                    # the full run (10-15 min on 2 cores; run it ALONE)
    .venv/bin/python benchmarks/train_cost.py --padding-only     # tokenizer only: the padding tables (~1 min)
    .venv/bin/python benchmarks/train_cost.py --model tiny-random --tasks email \\
        --data email=builtin:sample-train --warmup 0 --rounds 1 --gemm-size 64 --out /tmp/tc   # smoke

Settings come from the study configs (``configs/compare/study/<task>-main.yaml``: data, k,
max_length, the train block's batch size, LoRA rank/alpha, learning rate), so they cannot drift.

1. Padding (no forward pass). Every batch of one epoch is built by the real ``PairedCollator``
   (aligned layout: prompts left-padded so every response starts at one column, responses
   right-padded) and counted: padded / real tokens of the with-profile and of the counterfactual
   sequence, split into prompt (left) and response (right) padding; padded / real LM-head
   positions (B x R_max vs the real response tokens); and the aligned layout's cost over plain
   right padding (B x max(P_i + R_i)). Batches: "random" is the Trainer's own sampler (accelerate's
   SeedableRandomSampler, data_seed = seed, reshuffled per epoch; checked against the Trainer's
   dataloader in the timing part), "grouped" is ``train --group-by-length``
   (``encoding.length_grouped_order``). Mean over ``--epochs`` epochs (min-max in the JSON).
2. Peak: a float32 n x n matmul (``torch.mm``) timed ``--gemm-reps`` times: 2 n^3 / best time.
3. FLOPs of a step (counted from the model config and the batch's tensor shapes; see ``step_flops``):
   matmuls of the decoder (2 per weight per token forward; backward 2x forward for full
   fine-tuning, 1x for frozen weights under LoRA plus the adapters' own), attention scores and
   values over the full L x L (the CPU SDPA path with a padding mask does not skip the masked half),
   the LM head on the R response positions only. The E-step (perce) is one forward at the
   counterfactual width. Not counted: norms, activations, softmax, embeddings lookup, optimizer.
   "Computed" counts the padded tensors, "useful" each row at its own length (so computed - useful
   is what padding costs).
4. Timing: ce and perce (refresh every step), each on random and on grouped batches of the study's
   train data, one optimizer step each per round, in a rotating order; a step = training_step
   (forward, E-step, loss, backward) + grad clip + AdamW step + zero_grad. perce / ce is taken per
   round on the SAME batch, then median (min-max) over rounds.
"""
from __future__ import annotations

import argparse
import dataclasses
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


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- settings
def study_settings(task: str, a) -> dict:
    """The study's settings for ``task`` from its main config; ``--data task=PATH`` overrides the data."""
    import yaml
    cfg = yaml.safe_load((ROOT / "configs" / "compare" / "study" / f"{task}-main.yaml").read_text())
    tr = cfg.get("train", {})
    return {"task": cfg["task"], "data": a.data.get(task, cfg["data"]), "k": cfg["k"],
            "max_length": cfg["max_length"], "batch": tr.get("batch_size", 4), "lora": tr.get("lora", False),
            "lora_r": tr.get("lora_r", 8), "lora_alpha": tr.get("lora_alpha", 16),
            "learning_rate": tr.get("learning_rate", 2e-5), "seed": 0}


def tokenizer_and_config(name: str):
    """(tokenizer, model config) without loading weights (tiny-random builds in 0.1 s anyway)."""
    from transformers import AutoConfig, AutoTokenizer

    from percontrast.models import ensure_gemma3, ensure_smollm2, tiny_random
    if name == "tiny-random":
        model, tok = tiny_random()
        cfg = model.config
    else:
        path = {"smollm2-135m": ensure_smollm2, "gemma3-270m": ensure_gemma3}[name]() \
            if name in ("smollm2-135m", "gemma3-270m") else Path(name)
        tok, cfg = AutoTokenizer.from_pretrained(str(path)), AutoConfig.from_pretrained(str(path))
    if tok.pad_token_id is None:      # as models._finish: padding never reaches the loss
        tok.pad_token = tok.eos_token
    return tok, cfg


def encode_task(s: dict, tok, limit: int) -> list[dict]:
    from percontrast.datasets import load_records
    from percontrast.encoding import PromptBuilder, encode_all
    from percontrast.errors import UserError
    from percontrast.prompts import get_task
    try:
        records = load_records(s["data"], get_task(s["task"]), limit=limit or None)
    except (UserError, FileNotFoundError) as e:
        hint = (" (prepare it: percontrast data prepare sotu --out data/sotu-short --split user "
                "--max-examples-per-user 20 --max-output-words 64)" if s["task"] == "sotu" else "")
        raise SystemExit(f"error: {s['task']} data {s['data']}: {e}{hint}")
    builder = PromptBuilder(tok, get_task(s["task"]), k=s["k"], max_length=s["max_length"], seed=s["seed"])
    return encode_all(builder, records)


# ----------------------------------------------------------------------------- batches
def random_order(n: int, seed: int, epoch: int) -> list[int]:
    """The Trainer's order: accelerate replaces its RandomSampler by a SeedableRandomSampler with
    data_seed = seed, set to the epoch before each pass (``check_random_order`` compares)."""
    from accelerate.data_loader import SeedableRandomSampler
    sampler = SeedableRandomSampler(data_source=range(n), data_seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def grouped_order(rows, batch: int, seed: int, epoch: int) -> list[int]:
    from percontrast.encoding import length_grouped_order
    return length_grouped_order(rows, batch, seed, epoch)


def batches(rows, order, batch, pad_id) -> list[dict]:
    from percontrast.encoding import PairedCollator
    collate = PairedCollator(pad_id)
    return [collate([rows[i] for i in order[a:a + batch]]) for a in range(0, len(order), batch)]


def padding_counts(b: dict) -> dict:
    """Token counts of one collated batch, straight from its tensors."""
    out = {}
    P = int(b["resp_start"])
    for name, pre in (("with", ""), ("cf", "cf_")):
        att = b[f"{pre}attention_mask"]
        Pp = int(b[f"{pre}resp_start"])
        real = int(att.sum())
        out[name] = {"real": real, "cells": att.numel(),
                     "prompt_pad": int((att[:, :Pp] == 0).sum()), "response_pad": int((att[:, Pp:] == 0).sum()),
                     # plain right padding would need only the longest row
                     "right_padded_cells": att.shape[0] * int(att.sum(-1).max())}
    m = b["response_mask"]
    out["head"] = {"real": int(m.sum()), "cells": m.numel()}
    assert P == b["input_ids"].shape[1] - m.shape[1]
    return out


def sum_counts(cs: list[dict]) -> dict:
    tot: dict = {}
    for c in cs:
        for k, d in c.items():
            t = tot.setdefault(k, {})
            for kk, v in d.items():
                t[kk] = t.get(kk, 0) + v
    return tot


def shares(tot: dict) -> dict:
    """padded / real per pass (what the issue asks), and the parts."""
    r = {}
    for k in ("with", "cf"):
        d = tot[k]
        r[k] = {"padded_over_real": (d["cells"] - d["real"]) / d["real"],
                "prompt_pad_over_real": d["prompt_pad"] / d["real"],
                "response_pad_over_real": d["response_pad"] / d["real"],
                "aligned_over_right_padded": d["cells"] / d["right_padded_cells"]}
    r["head"] = {"padded_over_real": (tot["head"]["cells"] - tot["head"]["real"]) / tot["head"]["real"]}
    return r


# ----------------------------------------------------------------------------- FLOPs
def step_flops(mcfg, b: dict, *, lora_r: int = 0, lora_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
               e_step: bool = True) -> dict:
    """FLOPs of one step on batch ``b`` (see the module docstring): computed (padded shapes) and
    useful (each row at its own length, causal half of attention)."""
    H, nl, I, V = mcfg.hidden_size, mcfg.num_hidden_layers, mcfg.intermediate_size, mcfg.vocab_size
    nh = mcfg.num_attention_heads
    nkv = getattr(mcfg, "num_key_value_heads", None) or nh
    d = getattr(mcfg, "head_dim", None) or H // nh
    shapes = {"q_proj": (H, nh * d), "k_proj": (H, nkv * d), "v_proj": (H, nkv * d), "o_proj": (nh * d, H),
              "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    lin = 2 * nl * sum(i * o for i, o in shapes.values())                     # forward, per token
    adapters = 2 * nl * sum(lora_r * (shapes[m][0] + shapes[m][1]) for m in lora_modules if m in shapes) \
        if lora_r else 0
    head = 2 * H * V                                                           # per scored position
    bwd_lin, bwd_head = (1, 1) if lora_r else (2, 2)   # LoRA: no weight gradient for frozen weights

    def attn(L):                      # scores + weighted values, all heads, all layers, forward
        return 4 * nl * nh * d * L * L

    def passes(tokens, sq_sum, positions, train):
        fwd = (lin + adapters) * tokens + attn(1) * sq_sum + head * positions
        if not train:
            return fwd
        return fwd + (bwd_lin * lin + 2 * adapters) * tokens + 2 * attn(1) * sq_sum + bwd_head * head * positions

    att, catt, m = b["attention_mask"], b["cf_attention_mask"], b["response_mask"]
    B, Lw, Lc, R = att.shape[0], att.shape[1], catt.shape[1], m.shape[1]
    lw, lc, r = att.sum(-1).double(), catt.sum(-1).double(), m.sum().item()
    computed_train = passes(B * Lw, B * Lw * Lw, B * R, True)
    # useful: each row at its own length, attention over its own L_i x L_i (the causal half that SDPA
    # also computes is not counted as padding)
    useful_train = passes(lw.sum().item(), (lw * lw).sum().item(), r, True)
    computed_e = passes(B * Lc, B * Lc * Lc, B * R, False) if e_step else 0.0
    useful_e = passes(lc.sum().item(), (lc * lc).sum().item(), r, False) if e_step else 0.0
    return {"computed": computed_train + computed_e, "useful": useful_train + useful_e,
            "computed_train": computed_train, "computed_e_step": computed_e}


# ----------------------------------------------------------------------------- peak
def gemm_peak(n: int, reps: int) -> dict:
    """float32 n x n matmul: GFLOP/s = 2 n^3 / time, best and median of ``reps`` (after one warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return {"n": n, "reps": reps, "best_gflops": 2 * n**3 / min(ts) / 1e9,
            "median_gflops": 2 * n**3 / statistics.median(ts) / 1e9}


# ----------------------------------------------------------------------------- timing
def check_random_order(rows, s, tok, model, model_name, tmp) -> None:
    """The Trainer's own dataloader yields exactly ``random_order`` (so the padding of 'random'
    is the padding a run really sees)."""
    from percontrast.commands.train import ListDataset, TrainConfig, training_arguments
    from percontrast.encoding import PairedCollator
    from percontrast.trainer import PerCETrainer
    cfg = TrainConfig(model=model_name, data="unused", task=s["task"], k=s["k"], max_length=s["max_length"],
                      batch_size=s["batch"], output_dir=str(tmp / "check"), progress=False, method="ce", seed=s["seed"])
    tr = PerCETrainer(model=model, args=training_arguments(cfg), train_dataset=ListDataset(rows),
                      data_collator=PairedCollator(tok.pad_token_id), perce_args=cfg)
    got = [i for batch in tr.get_train_dataloader() for i in batch["idx"].tolist()]
    want = [rows[i]["idx"] for i in random_order(len(rows), s["seed"], 0)]
    assert got == want, "the Trainer's random order is not the one measured"


class Step:
    """One optimizer step of ``trainer``'s method on a given batch (shared model and optimizer)."""

    def __init__(self, trainer, model, opt):
        self.trainer, self.model, self.opt = trainer, model, opt

    def __call__(self, batch) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        n_items = int((batch["labels"] != -100).sum())
        self.trainer.training_step(self.model, dict(batch), n_items)
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.trainer.state.global_step += 1
        return time.perf_counter() - w0, time.process_time() - c0


def timing(a, s, rows, tok, mcfg, tmp) -> dict:
    from percontrast.commands.train import TrainConfig, apply_lora, training_arguments
    from percontrast.models import load_model
    from percontrast.trainer import PerCETrainer

    torch.manual_seed(0)
    model, tok = load_model(a.model)
    cfg = TrainConfig(model=a.model, data=s["data"], task=s["task"], k=s["k"], max_length=s["max_length"],
                      batch_size=s["batch"], lora=s["lora"], lora_r=s["lora_r"], lora_alpha=s["lora_alpha"],
                      learning_rate=s["learning_rate"], output_dir=str(tmp / "t"), progress=False)
    check_random_order(rows, s, tok, model, a.model, tmp)
    if s["lora"]:
        model = apply_lora(model, cfg)
    model.train()   # as the Trainer's loop does (load_model hands the model back in eval mode)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["learning_rate"])
    steps = {}
    for m in ("ce", "perce"):
        c = dataclasses.replace(cfg, method=m, output_dir=str(tmp / m))
        steps[m] = Step(PerCETrainer(model=model, args=training_arguments(c), perce_args=c), model, opt)
    n = a.warmup + a.rounds
    streams = {"random": batches(rows, random_order(len(rows), s["seed"], 0), s["batch"], tok.pad_token_id)[:n],
               "grouped": batches(rows, grouped_order(rows, s["batch"], s["seed"], 0), s["batch"], tok.pad_token_id)[:n]}
    cells = [(m, k) for k in streams for m in steps]
    res = {f"{m}/{k}": {"wall_s": [], "cpu_s": [], "gflops": [], "real_tokens": []} for m, k in cells}
    lora_r = s["lora_r"] if s["lora"] else 0
    for r in range(n):
        order = cells[r % len(cells):] + cells[: r % len(cells)]      # rotate: no variant always first
        for m, k in order:
            b = streams[k][r % len(streams[k])]
            w, c = steps[m](b)
            if r < a.warmup:
                continue
            f = step_flops(mcfg, b, lora_r=lora_r, e_step=m == "perce")
            d = res[f"{m}/{k}"]
            d["wall_s"].append(w)
            d["cpu_s"].append(c)
            d["gflops"].append(f["computed"] / w / 1e9)
            d["real_tokens"].append(int(b["attention_mask"].sum()))
        if r >= a.warmup:
            print(f"  round {r + 1 - a.warmup}/{a.rounds} load {load_avg()} " +
                  " ".join(f"{key}={d['wall_s'][-1]:.2f}s" for key, d in res.items()), flush=True)
    out = {"cells": {}, "ratios": {}}
    for key, d in res.items():
        out["cells"][key] = {"median_s": statistics.median(d["wall_s"]), "min_s": min(d["wall_s"]),
                             "max_s": max(d["wall_s"]), "median_cpu_s": statistics.median(d["cpu_s"]),
                             "median_gflops": statistics.median(d["gflops"]),
                             "s_per_1k_real_tokens": 1e3 * sum(d["wall_s"]) / sum(d["real_tokens"]), **d}
    for k in streams:
        per = [p / c for p, c in zip(res[f"perce/{k}"]["wall_s"], res[f"ce/{k}"]["wall_s"])]
        out["ratios"][f"perce/ce {k}"] = {"median": statistics.median(per), "min": min(per), "max": max(per)}
    for m in steps:
        out["ratios"][f"{m} grouped/random per real token"] = (
            out["cells"][f"{m}/grouped"]["s_per_1k_real_tokens"] / out["cells"][f"{m}/random"]["s_per_1k_real_tokens"])
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="email,sotu", help="study tasks to measure padding on")
    p.add_argument("--time-task", default="email", help="the task whose batches are timed")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="use PATH instead of the study config's data for TASK (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="encode only the first N records (0: all)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of batches to count padding over")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=14, help="timed rounds (one step of each of the 4 cells each); "
                   "with the 2 warm-up rounds the random stream is the study's 16 steps (seed 0)")
    p.add_argument("--gemm-size", type=int, default=2048)
    p.add_argument("--gemm-reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--padding-only", action="store_true", help="only the padding tables (tokenizer, no forward)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_cost"))
    a = p.parse_args(argv)
    a.data = dict(x.split("=", 1) for x in a.data)
    if a.threads:
        torch.set_num_threads(a.threads)

    import transformers
    transformers.logging.set_verbosity_error()
    started = datetime.now(timezone.utc)
    info = {"date_utc": started.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "cpu": cpu_name(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "model": a.model, "load_start": load_avg(),
            "args": {k: v for k, v in vars(a).items() if k != "out"}}
    print(f"load at start: {info['load_start']}", flush=True)
    tok, mcfg = tokenizer_and_config(a.model)
    res = {"info": info, "padding": {}, "settings": {}}
    rows_by_task = {}
    for task in a.tasks.split(","):
        s = study_settings(task, a)
        rows = rows_by_task[task] = encode_task(s, tok, a.limit)
        res["settings"][task] = s
        lora_r = s["lora_r"] if s["lora"] else 0
        pad = {}
        for kind, order_fn in (("random", lambda e: random_order(len(rows), s["seed"], e)),
                               ("grouped", lambda e: grouped_order(rows, s["batch"], s["seed"], e))):
            per_epoch, flops = [], []
            for e in range(a.epochs):
                bs = batches(rows, order_fn(e), s["batch"], tok.pad_token_id)
                per_epoch.append(shares(sum_counts([padding_counts(b) for b in bs])))
                fl = [step_flops(mcfg, b, lora_r=lora_r) for b in bs]
                flops.append(1 - sum(f["useful"] for f in fl) / sum(f["computed"] for f in fl))
            mean = {k: {kk: statistics.fmean(ep[k][kk] for ep in per_epoch) for kk in per_epoch[0][k]}
                    for k in per_epoch[0]}
            pad[kind] = {"mean": mean, "epochs": per_epoch, "perce_flops_on_padding": statistics.fmean(flops),
                         "steps_per_epoch": len(bs)}
        res["padding"][task] = {"examples": len(rows), **pad}
        print(f"{task}: {len(rows)} examples; padded/real with-profile random "
              f"{pad['random']['mean']['with']['padded_over_real']:.3f} grouped "
              f"{pad['grouped']['mean']['with']['padded_over_real']:.3f}", flush=True)
    if not a.padding_only:
        res["gemm"] = gemm_peak(a.gemm_size, a.gemm_reps)
        print(f"sgemm {a.gemm_size}: {res['gemm']['best_gflops']:.1f} GFLOP/s (best)", flush=True)
        s = res["settings"][a.time_task]
        rows = rows_by_task.get(a.time_task) or encode_task(s, tok, a.limit)
        with tempfile.TemporaryDirectory() as tmp:
            res["timing"] = timing(a, s, rows, tok, mcfg, Path(tmp))
    info["load_end"] = load_avg()
    info["wall_s"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
    write(a, res)


def write(a, res) -> None:
    info = res["info"]
    md = [f"# Training cost per step ({info['model']})\n",
          f"Date {info['date_utc']} UTC, host {info['host']}, {info['cores']} cores ({info['cpu']}), "
          f"torch {info['torch']} ({info['torch_threads']} thread(s)), transformers {info['transformers']}. "
          f"Load average (1/5/15 min) at start {info['load_start']}, at end {info['load_end']}; "
          f"wall {info['wall_s']} s. Method: benchmarks/train_cost.py docstring; notes: benchmarks/NOTES.md.\n",
          "## Padding per pass (padded / real tokens; real collator, aligned layout)\n",
          "| task | batches | with-profile (prompt + response pad) | counterfactual (prompt + response pad) "
          "| LM-head positions | aligned / right-padded cells (with, cf) | perce FLOPs on padding |",
          "|---|---|---|---|---|---|---|"]
    for task, d in res["padding"].items():
        s = res["settings"][task]
        for kind in ("random", "grouped"):
            m = d[kind]["mean"]
            w, c = m["with"], m["cf"]
            md.append(f"| {task} ({d['examples']} ex., k {s['k']}, max_length {s['max_length']}, batch {s['batch']}) "
                      f"| {kind} | {w['padded_over_real']:.3f} ({w['prompt_pad_over_real']:.3f} + "
                      f"{w['response_pad_over_real']:.3f}) | {c['padded_over_real']:.3f} ({c['prompt_pad_over_real']:.3f}"
                      f" + {c['response_pad_over_real']:.3f}) | {m['head']['padded_over_real']:.3f} | "
                      f"{w['aligned_over_right_padded']:.3f}, {c['aligned_over_right_padded']:.3f} | "
                      f"{d[kind]['perce_flops_on_padding']:.1%} |")
    md.append(f"\nMean over {res['info']['args']['epochs']} epochs of batches (per-epoch values in the JSON). "
              "'random': the Trainer's sampler (data_seed 0); 'grouped': `train --group-by-length`. "
              "perce FLOPs on padding: 1 - useful / computed FLOPs of a perce step (training pass + E-step).")
    if "gemm" in res:
        g = res["gemm"]
        md += ["\n## Peak and achieved FLOP/s\n",
               f"float32 matmul peak (torch.mm {g['n']}x{g['n']}, best of {g['reps']}): "
               f"**{g['best_gflops']:.1f} GFLOP/s** (median {g['median_gflops']:.1f}).\n"]
    if "timing" in res:
        t, s = res["timing"], res["settings"][a.time_task]
        peak = res["gemm"]["best_gflops"]
        md += [f"## Step time at the study's shapes ({a.time_task}, k {s['k']}, max_length {s['max_length']}, "
               f"batch {s['batch']}, {'LoRA r %d alpha %d' % (s['lora_r'], s['lora_alpha']) if s['lora'] else 'full'}"
               f", {a.warmup} warm-up + {a.rounds} timed rounds, interleaved)\n",
               "| method / batches | step median s (min-max) | s per 1k real tokens | achieved GFLOP/s (median) "
               "| % of matmul peak |", "|---|---|---|---|---|"]
        for key, d in t["cells"].items():
            md.append(f"| {key} | {d['median_s']:.2f} ({d['min_s']:.2f}-{d['max_s']:.2f}) | "
                      f"{d['s_per_1k_real_tokens']:.3f} | {d['median_gflops']:.1f} | {d['median_gflops'] / peak:.0%} |")
        md.append("")
        for key, d in t["ratios"].items():
            md.append(f"- {key}: " + (f"{d['median']:.3f} ({d['min']:.3f}-{d['max']:.3f}), per round on the same batch"
                                      if isinstance(d, dict) else f"{d:.3f} (ratio of sums)"))
        md.append("\nWall-clock seconds (process CPU time in the JSON). Achieved GFLOP/s = computed FLOPs of the "
                  "step (padded shapes, see the docstring) / step wall time; the step includes clip + AdamW.")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out.with_suffix(".md"), "\n".join(md) + "\n"),
                       (out.with_suffix(".json"), json.dumps(res, indent=2, default=str))):
        tmpf = path.with_name(f".{path.name}.tmp")
        tmpf.write_text(text)
        os.replace(tmpf, path)
    print("\n".join(md))
    print(f"\nwrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
