"""Cost of scale on CPU: training throughput of ce and perce at 1 process and at 2 processes (DDP and
FSDP2), all measured in ONE invocation, one configuration after the other (never two at once).

    .venv/bin/python benchmarks/scaling.py                     # smollm2-135m, 5.5 min on a shared 2-core box
    .venv/bin/python benchmarks/scaling.py --model tiny-random --steps 2 --warmup 1 --out /tmp/s   # smoke

Configurations (every process has 1 torch thread, so 1 process uses 1 core and 2 processes 2):
  1 process      plain ``python`` running this file's worker
  DDP, 2 proc.   ``accelerate launch --config_file configs/accelerate/cpu-2proc.yaml``
  FSDP2, 2 proc. ``accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2``,
                 with the one patch tests/test_fsdp.py explains (accelerate 1.15 drops an FSDP plugin
                 on CPU and would silently train with DDP); the engine is checked after the run.
Each configuration trains ``ce`` then ``perce`` (refresh every step, the paper's bootstrap) with the
real CLI (``percontrast.cli.main``), the same per-process batch (``--batch``: 2 processes train a
global batch twice as large, weak scaling), AdamW, fp32, ``--warmup`` untimed then ``--steps``
timed optimizer steps. A step is timed from the Trainer's ``on_step_begin`` to its ``on_step_end``
(forward, E-step, backward, gradient reduction, optimizer); the ranks of a step are synchronous,
so a step's wall time is the slowest rank's. Checkpoints and the final save are switched off in the
worker (not timed; 1.6 GB of writes per run for a 135M model with AdamW).

Reported, over the timed steps:
  tokens/s       response tokens trained (summed over processes) per wall second. 2 processes /
                 1 process is the speed-up from a second core; ideal 2.0.
  tokens/CPU-s   the same tokens per second of CPU time of all processes (time.process_time, which
                 counts gloo's work but not a blocked wait). 2 processes / 1 process is the parallel
                 efficiency, ideal 1.0; it hardly moves when other jobs share the machine, while the
                 wall-clock numbers do (the load averages are in the results).
  perce / ce     of either. Under FSDP, perce also re-gathers every decoder layer once per step
                 (tests/test_fsdp.py counts it), so its ratio may grow with FSDP.
Records: synthetic, all of one shape (profile 2 x 16 words, input 10 words, response 32 words), so
every step has the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
WORDS = ("bike market figs stew coast lentil climb harbour pastry tram river garden chess violin "
         "lisbon porto sintra saturday sunday tomorrow letter meeting plans budget").split()


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def write_data(path: Path, n: int, seed: int = 0) -> Path:
    import random
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    rows = [{"id": f"u{i % 4}-{i}", "user_id": f"u{i % 4}", "input": "Write a note about " + words(6),
             "output": words(32), "profile": [{"title": words(2), "text": words(14)} for _ in range(2)]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the worker


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    if spec["threads"]:
        import torch
        torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.fsdp import force_fsdp_on_cpu   # the test's patch, one copy
    force_fsdp_on_cpu()
    import torch
    from transformers import TrainerCallback

    import percontrast.commands.train as train_cmd
    import percontrast.trainer as tr
    from percontrast.cli import main

    rec: dict = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            rec["t0"], rec["c0"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            rec["steps"].append(time.perf_counter() - rec["t0"])
            rec["cpu"].append(time.process_time() - rec["c0"])

    real_init, real_step = tr.PerCETrainer.__init__, tr.PerCETrainer.training_step

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.add_callback(Timer())

    def training_step(self, model, inputs, num_items_in_batch=None):
        if "engine" not in rec:
            from torch.distributed.fsdp import FSDPModule
            rec["engine"] = ("fsdp2" if isinstance(model, FSDPModule) else
                             "ddp" if isinstance(model, torch.nn.parallel.DistributedDataParallel) else
                             type(model).__name__)
        rec["tokens"].append(int(inputs["response_mask"].sum()))
        rec["all_tokens"].append(int(inputs["attention_mask"].sum()) + int(inputs["cf_attention_mask"].sum())
                                 * (self.perce.method == "perce"))
        return real_step(self, model, inputs, num_items_in_batch)

    tr.PerCETrainer.__init__, tr.PerCETrainer.training_step = init, training_step
    tr.PerCETrainer._save_checkpoint = lambda self, model, trial: None     # not timed: off
    train_cmd._save_final = lambda trainer, out, main_proc: None
    rank = os.environ.get("RANK", "0")
    results = {}
    for run in spec["runs"]:
        rec.clear()
        rec.update(steps=[], cpu=[], tokens=[], all_tokens=[])
        rc = main(run["argv"])
        if rc:
            sys.exit(rc)
        results[run["name"]] = {k: rec[k] for k in ("engine", "steps", "cpu", "tokens", "all_tokens")}
    (spec_path.parent / f"{spec_path.stem}.rank-{rank}.json").write_text(json.dumps(results))


# ----------------------------------------------------------------------------- the driver
def run_config(name: str, launcher: list[str] | None, args, data: Path, tmp: Path) -> dict:
    runs = [{"name": m, "argv": ["train", "--model", args.model, "--data", str(data), "--task", "generic",
                                 "--method", m, "--max-steps", str(args.warmup + args.steps),
                                 "--batch-size", str(args.batch), "--max-length", "512", "--warmup", "0",
                                 "--lr-scheduler", "constant", "--learning-rate", "1e-5", "--no-progress",
                                 "--no-report", "--output-dir", str(tmp / f"{name}-{m}"), "--overwrite"]}
            for m in ("ce", "perce")]
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"runs": runs, "threads": 1}))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [*(launcher or [sys.executable]), str(Path(__file__).resolve()), "--worker", str(spec)]
    load_before, t0 = load_avg(), time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    if p.returncode:
        sys.exit(f"{name}: failed\n{p.stderr[-3000:]}")
    ranks = [json.loads(f.read_text()) for f in sorted(tmp.glob(f"{spec.stem}.rank-*.json"))]
    out = {"processes": len(ranks), "load_before": load_before, "load_after": load_avg(),
           "wall_s": round(time.perf_counter() - t0, 1)}
    for m in ("ce", "perce"):
        engines = {r[m]["engine"] for r in ranks}
        w = args.warmup
        step_s = [max(r[m]["steps"][i] for r in ranks) for i in range(w, w + args.steps)]
        cpu_s = sum(sum(r[m]["cpu"][w:w + args.steps]) for r in ranks)     # all processes' CPU time
        tokens = sum(sum(r[m]["tokens"][w:w + args.steps]) for r in ranks)
        all_tokens = sum(sum(r[m]["all_tokens"][w:w + args.steps]) for r in ranks)
        out[m] = {"engine": sorted(engines), "step_s_median": round(statistics.median(step_s), 3),
                  "step_s": [round(s, 3) for s in step_s], "response_tokens": tokens,
                  "tokens_per_s": round(tokens / sum(step_s), 2),
                  "tokens_per_cpu_s": round(tokens / cpu_s, 2),
                  "all_tokens_per_s": round(all_tokens / sum(step_s), 2)}
    print(f"{name}: " + ", ".join(f"{m} {out[m]['tokens_per_s']} tok/s, {out[m]['tokens_per_cpu_s']} tok/CPU-s "
                                  f"({out[m]['engine']})" for m in ("ce", "perce")), flush=True)
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("torch", "transformers", "accelerate", "peft")}


def write_report(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    c, r, a = res["configs"], res["ratios"], res["args"]
    lines = [
        "# Cost of scale on CPU: ce and perce at 1 and 2 processes (DDP, FSDP2)",
        "",
        f"Script: `{' '.join(res['argv'])}`, one run. Measured {res['date']} on {res['machine']}; "
        f"{', '.join(f'{k} {v}' for k, v in res['versions'].items())}. Model `{a['model']}` (fp32, AdamW), "
        f"batch {a['batch']} per process, 1 torch thread per process, {a['warmup']} untimed + {a['steps']} timed "
        f"optimizer steps per cell. Load average (1/5/15 min) at the start: {res['load_start']}; at the end: "
        f"{res['load_end']}.",
        "",
        "| configuration | engine | ce tok/s | perce tok/s | ce tok/CPU-s | perce tok/CPU-s | perce / ce (wall) | "
        "perce / ce (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in c.items():
        lines.append(f"| {name} | {', '.join(v['perce']['engine'])} | {v['ce']['tokens_per_s']} "
                     f"({v['ce']['step_s_median']} s/step) | {v['perce']['tokens_per_s']} "
                     f"({v['perce']['step_s_median']} s/step) | {v['ce']['tokens_per_cpu_s']} | "
                     f"{v['perce']['tokens_per_cpu_s']} | {r['perce/ce wall'][name]:.2f} | {r['perce/ce cpu'][name]:.2f} |")
    lines += ["", "| 2 processes / 1 process | ce speed-up (wall, ideal 2) | perce speed-up (wall) | "
              "ce efficiency (CPU, ideal 1) | perce efficiency (CPU) |", "|---|---|---|---|---|"]
    for name, v in r["vs 1 process"].items():
        lines.append(f"| {name} | {v['ce wall']:.2f} | {v['perce wall']:.2f} | {v['ce cpu']:.2f} | {v['perce cpu']:.2f} |")
    lines += ["", "Load average before / after each configuration: "
              + "; ".join(f"{n}: {v['load_before']} / {v['load_after']} ({v['wall_s']} s)" for n, v in c.items())
              + ".", "", res["note"], ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=2, help="examples per process per step")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per cell")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per cell")
    ap.add_argument("--only", choices=("1", "ddp", "fsdp"), action="append",
                    help="measure only these configurations (a smoke test; ratios need all three)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling"))
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker))
        return
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", "--config_file"]
    configs = {"1 process": None,
               "DDP, 2 processes": [*launch, str(CONFIGS / "cpu-2proc.yaml")],
               "FSDP2, 2 processes": [*launch, str(CONFIGS / "fsdp.yaml"), "--num_processes", "2"]}
    if args.only:
        keep = {"1": "1 process", "ddp": "DDP, 2 processes", "fsdp": "FSDP2, 2 processes"}
        configs = {keep[k]: configs[keep[k]] for k in args.only}
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
           "versions": versions(), "args": {k: v for k, v in vars(args).items() if k != "worker"},
           "argv": ["benchmarks/scaling.py", *sys.argv[1:]], "load_start": load_avg(), "configs": {}}
    with tempfile.TemporaryDirectory(prefix="scaling-") as d:
        tmp = Path(d)
        # enough records that no run repeats one within its steps (2 processes x batch x steps)
        data = write_data(tmp / "train.jsonl", n=2 * args.batch * (args.warmup + args.steps))
        for name, launcher in configs.items():
            res["configs"][name] = run_config(name.split(",")[0].replace(" ", "-"), launcher, args, data, tmp)
    res["load_end"] = load_avg()
    c = res["configs"]
    if len(c) < 3:
        print(json.dumps({n: {m: {k: v[m][k] for k in ("engine", "tokens_per_s", "tokens_per_cpu_s")}
                              for m in ("ce", "perce")} for n, v in c.items()}, indent=1))
        return
    expect = {"1 process": "PerCETrainer", "DDP, 2 processes": "ddp", "FSDP2, 2 processes": "fsdp2"}
    for name, v in c.items():
        for m in ("ce", "perce"):
            if v[m]["engine"] != [expect[name]] and not (name == "1 process"):
                sys.exit(f"{name} {m}: trained with {v[m]['engine']}, expected {expect[name]}")
    base = c["1 process"]
    res["ratios"] = {
        "perce/ce wall": {n: v["perce"]["tokens_per_s"] / v["ce"]["tokens_per_s"] for n, v in c.items()},
        "perce/ce cpu": {n: v["perce"]["tokens_per_cpu_s"] / v["ce"]["tokens_per_cpu_s"] for n, v in c.items()},
        "vs 1 process": {n: {f"{m} {k}": v[m][f] / base[m][f] for m in ("ce", "perce")
                             for k, f in (("wall", "tokens_per_s"), ("cpu", "tokens_per_cpu_s"))}
                         for n, v in c.items() if n != "1 process"},
    }
    res["note"] = ("Speed-up: tokens per wall second of 2 processes (2 cores) over 1 process (1 core). "
                   "Efficiency: tokens per CPU second, the same ratio; below 1 is what the engine's "
                   "communication and bookkeeping cost. The machine is shared with other jobs: wall-clock "
                   "numbers move with the load averages above, CPU-time numbers much less.")
    write_report(res, Path(args.out))
    print(json.dumps(res["ratios"], indent=1))
    print(f"wrote {Path(args.out).with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
