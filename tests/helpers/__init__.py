"""Shared helpers for the reliability tests (distributed, resume, hostile input, security)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

WORDS = ("bike market figs stew coast lentil climb harbour pastry tram river garden chess violin "
         "lisbon porto sintra saturday sunday tomorrow letter meeting plans budget").split()


def write_records(path: Path, n: int = 8, seed: int = 0) -> Path:
    """n generic-task records whose responses have very different lengths (3 .. ~40 words),
    so that the processes of a distributed run see uneven numbers of response tokens."""
    import random
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        n_words = 3 + (i * 7) % 37
        rows.append({
            "id": f"u{i % 3}-{i}", "user_id": f"u{i % 3}",
            "input": "Write a short note about " + " ".join(rng.sample(WORDS, 3)),
            "output": " ".join(rng.choice(WORDS) for _ in range(n_words)),
            "profile": [{"title": rng.choice(WORDS), "text": " ".join(rng.sample(WORDS, 6))} for _ in range(2)],
        })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``percontrast.cli.main(argv)`` in-process: (exit code, stdout, stderr). A traceback escapes."""
    from percontrast.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse errors
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def run_cli_subprocess(argv: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "percontrast.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(**env), cwd=str(ROOT))


def load_params(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def step_losses(out_dir: Path) -> list[float]:
    res = json.loads((Path(out_dir) / "train_results.json").read_text())
    return [h["loss"] for h in res["log"] if "loss" in h]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under folder ({} if absent)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def model_load_args(monkeypatch, module, cls, argv: list[str]) -> list:
    """Parse ``argv`` into ``cls`` as the CLI does and run ``module.run`` with
    ``percontrast.models.load_model`` replaced by a recorder that stops the run at the model load;
    returns the recorded [(name, kwargs)]."""
    import argparse

    import pytest

    from percontrast import config as C
    from percontrast import models

    class Loaded(Exception):
        pass

    calls = []

    def record(name, **kw):
        calls.append((name, kw))
        raise Loaded

    monkeypatch.setattr(models, "load_model", record)
    p = argparse.ArgumentParser()
    C.add_arguments(p, cls)
    with pytest.raises(Loaded):
        module.run(C.from_args(cls, p.parse_args(argv)))
    return calls
