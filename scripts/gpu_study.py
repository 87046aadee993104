#!/usr/bin/env python3
"""Run study-v2 compare configs on a CUDA GPU with bf16 autocast training, as a separate, labelled set.

    python scripts/gpu_study.py configs/compare/study-v2/email-budget.yaml configs/compare/study-v2/sotu-budget.yaml \\
        --out-root "$OUT/gpu" --budget-s 480 --tar "$OUT/gpu-study.tar.gz"
    python scripts/gpu_study.py configs/compare/study-v2/email-budget.yaml --cpu --out-root /tmp/gs \\
        --override '{model: tiny-random, data: builtin:sample-train, limit: 8, ...}'    # smoke run, no GPU

Each config runs as ``percontrast compare`` would, with ``output_dir`` = ``<out-root>/<config stem>`` and
``train.bf16: true`` (the master weights stay float32; ``--cpu`` keeps float32 training for a smoke run).
``GPU_RUN.md`` in each folder labels it: the machine, GPU, versions, date, and that these cells are a GPU
set trained in bf16 autocast, NOT the CPU study. Their cell hashes differ from the CPU cells'
(``train.config.bf16``), so ``compare --reuse-cells-from`` never mixes the two. Configs run in order; one
is not started when less than ``--min-left-s`` of ``--budget-s`` is left. compare keeps finished cells and
checkpoints (``train.save_steps``), so running the same command again continues where it stopped.
``--tar`` bundles every folder's cells, results, config and label (not ``_train/``) into one file, since
the device machine returns at most 8 files. ``--override`` is a YAML mapping merged over every config
(its ``train:`` merged key by key), for smoke runs and for the device's data paths.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def merged(base: dict, over: dict) -> dict:
    out = {**base, **{k: v for k, v in over.items() if k != "train"}}
    if "train" in over:
        out["train"] = {**(base.get("train") or {}), **(over["train"] or {})}
    return out


def label(folder: Path, config: Path, values: dict, cuda: bool) -> None:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if cuda else "none (--cpu smoke run)"
    what = ("**A separate set, not part of the CPU study.** Trained with bf16 autocast on a GPU (float32 master "
            "weights); the CPU cells train in float32. Cell hashes differ (`train.config.bf16`), so the two sets "
            "never mix in one table.") if cuda else \
        "**A smoke run of the script on a CPU (float32, settings overridden): not a result of any kind.**"
    (folder / "GPU_RUN.md").write_text(
        f"# GPU run of {config.name}\n\n{what}\n\n"
        f"- command: `python scripts/gpu_study.py {config}` (output_dir {folder})\n"
        f"- model: {values.get('model')}; data: {values.get('data')}\n"
        f"- GPU: {gpu}; host {platform.node()}, {platform.processor() or platform.machine()}\n"
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}\n"
        f"- started {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n")


def bundle(tar_path: Path, folders: list[Path]) -> None:
    with tarfile.open(tar_path, "w:gz") as tar:
        for f in folders:
            for p in sorted(f.rglob("*")):
                rel = p.relative_to(f.parent)
                if p.is_file() and "_train" not in rel.parts:
                    tar.add(p, arcname=str(rel))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", type=Path)
    ap.add_argument("--out-root", type=Path, default=ROOT / "results" / "study-v2-gpu")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole run")
    ap.add_argument("--min-left-s", type=float, default=60.0, help="do not start a config with less left")
    ap.add_argument("--tar", type=Path, default=None, help="bundle the results into this .tar.gz")
    ap.add_argument("--override", default=None, help="YAML mapping merged over every config")
    ap.add_argument("--cpu", action="store_true", help="run without a GPU (float32): a smoke run")
    a = ap.parse_args(argv)

    import torch
    import yaml

    from percontrast import config as cfgmod
    from percontrast.commands import compare as C
    from percontrast.errors import UserError

    t0 = time.monotonic()
    cuda = torch.cuda.is_available() and not a.cpu
    if not cuda and not a.cpu:
        print("error: no CUDA GPU here; pass --cpu for a float32 smoke run", file=sys.stderr)
        return 2
    try:
        over = yaml.safe_load(a.override) if a.override else {}
    except yaml.YAMLError as e:
        print(f"error: --override: not YAML ({str(e).splitlines()[0]})", file=sys.stderr)
        return 2
    if not isinstance(over, dict):
        print("error: --override: must be a YAML mapping", file=sys.stderr)
        return 2
    done, rc = [], 0
    for config in a.configs:
        left = a.budget_s - (time.monotonic() - t0)
        if left < a.min_left_s:
            print(f"{config}: not started ({left:.0f} s of the budget left)")
            rc = 1
            continue
        try:
            values = yaml.safe_load(config.read_text())
        except (OSError, yaml.YAMLError) as e:
            print(f"error: {config}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        if not isinstance(values, dict):
            print(f"error: {config}: not a YAML mapping", file=sys.stderr)
            return 2
        folder = a.out_root / config.stem
        values = merged(values, {**over, "output_dir": str(folder), "progress": False,
                                 "train": {**(over.get("train") or {}), **({"bf16": True} if cuda else {})}})
        try:
            cfg = cfgmod.build(C.CompareConfig, values, source=str(config))
            folder.mkdir(parents=True, exist_ok=True)
            label(folder, config, values, cuda)
            t1 = time.monotonic()
            res = C.run(cfg)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        done.append(folder)
        print(f"{config}: {res.get('cells_computed', 0)} cells computed in {time.monotonic() - t1:.0f} s -> {folder}",
              flush=True)
        if a.tar:   # after every config, so a run killed at its limit still returns what it finished
            bundle(a.tar, done)
    summary = {"configs": [str(c) for c in a.configs], "finished": [str(f) for f in done],
               "wall_s": round(time.monotonic() - t0, 1), "gpu": cuda}
    print(json.dumps(summary))
    return rc


if __name__ == "__main__":
    sys.exit(main())
