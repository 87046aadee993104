"""Security: no remote code unless asked, no pickle, safe YAML, HTML pages that escape everything.

The HTML check renders real ``percontrast score`` output in headless Chromium (Debian package
``chromium``) and inspects the DOM after load: injected ``<script>`` / ``<img onerror>`` /
``" onmouseover=`` from records, profiles, ids and the model path must show up as text, never as
elements or attributes, and the page must reference nothing on the network. Without Chromium
the browser test is skipped, except under ``CI=true``, where it fails.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT, run_cli
from helpers.browser import assert_inert_html as _assert_inert

PKG = ROOT / "percontrast"
SOURCES = {p: p.read_text(encoding="utf-8") for p in sorted(PKG.rglob("*.py"))}
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _calls(pattern: str):
    rx = re.compile(pattern)
    return [(p.name, i + 1, line.strip()) for p, text in SOURCES.items()
            for i, line in enumerate(text.splitlines()) if rx.search(line)]


# -- pickle: every loader call in the package, by AST (multi-line calls, aliases, ``from torch import load``) ----

# Calls that unpickle. torch.load is safe only with a literal weights_only=True; numpy.load only without
# allow_pickle=True; the others have no safe mode at all.
_UNPICKLERS = {"torch.load", "torch.serialization.load", "pickle.load", "pickle.loads", "pickle.Unpickler",
               "_pickle.load", "_pickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
               "joblib.load", "pandas.read_pickle", "numpy.load"}


def _loader_calls(source: str, filename: str = "<src>") -> list[tuple[str, int, str, bool]]:
    """(file, line, resolved name, safe) for every Call in ``source`` that resolves to an unpickler."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(f):
        if isinstance(f, ast.Name):
            return aliases.get(f.id, f.id)
        if isinstance(f, ast.Attribute):
            base = dotted(f.value)
            return f"{base}.{f.attr}" if base else None
        return None

    def kw_is(call, name, value):
        return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
                   for k in call.keywords)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (name := dotted(node.func)) in _UNPICKLERS:
            if name in ("torch.load", "torch.serialization.load"):
                safe = kw_is(node, "weights_only", True)
            elif name == "numpy.load":
                # no **kwargs, and allow_pickle absent (default False) or a literal False
                safe = all(k.arg is not None and (k.arg != "allow_pickle" or kw_is(node, "allow_pickle", False))
                           for k in node.keywords)
            else:
                safe = False
            found.append((filename, node.lineno, name, safe))
    return found


def test_loader_scan_catches_what_a_line_regex_misses():
    """The scanner itself: it must flag each unsafe form and pass each safe one."""
    bad = {
        "multi_line": "import torch\nx = torch.load(\n    p,\n    map_location='cpu',\n)\n",
        "explicit_false": "import torch\ntorch.load(p, weights_only=False)\n",
        "alias": "import torch as T\nT.load(p)\n",
        "from_import": "from torch import load as L\nL(p)\n",
        "kwargs_hidden": "import torch\ntorch.load(p, **kw)\n",
        "pickle": "import pickle\npickle.loads(b)\n",
        "pickle_in_function": "def f(b):\n    import pickle as pk\n    return pk.load(b)\n",
        "numpy_pickle": "import numpy as np\nnp.load(p, allow_pickle=True)\n",
    }
    for name, src in bad.items():
        calls = _loader_calls(src)
        assert calls and not all(c[3] for c in calls), name
    good = ("import torch\ns = torch.load(\n    p,\n    map_location='cpu',\n    weights_only=True,\n)\n"
            "import numpy as np\nnp.load(q)\n")
    assert [(c[2], c[3]) for c in _loader_calls(good)] == [("torch.load", True), ("numpy.load", True)]


def test_every_unpickling_call_in_the_package_is_weights_only():
    calls = [c for p, text in SOURCES.items() for c in _loader_calls(text, str(p.relative_to(ROOT)))]
    # not vacuous: the checkpoint loader (checkpointing.py) is one of them
    assert any(c[2] == "torch.load" and c[0].endswith("checkpointing.py") for c in calls), calls
    unsafe = [c for c in calls if not c[3]]
    assert not unsafe, unsafe


# -- pickle: a poisoned checkpoint is refused, and its code never runs --------------------------------------

class _RunsCode:
    """Unpickling this runs ``exec`` (writes a marker file): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _poison(path: Path, marker: Path) -> None:
    import torch
    torch.save({"_pir_cache": _RunsCode(marker), "skipped_nonfinite": 0}, path)


def _assert_poison_is_live(path: Path, marker: Path) -> None:
    """Control: the file really runs code when unpickled unsafely (so a refusal below means something)."""
    import torch
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()


def test_extra_state_loader_refuses_a_pickled_object(tmp_path):
    """``AtomicCheckpointMixin._load_optimizer_and_scheduler`` reads ``percontrast_state.pt`` from the checkpoint
    being resumed: a file holding a code-running pickle raises, and the code does not run. A benign state file
    (tensors, ints) still loads, so the refusal is the weights-only rule, not a loader that reads nothing."""
    import torch

    from percontrast.checkpointing import EXTRA_STATE, AtomicCheckpointMixin

    class _Base:
        def _load_optimizer_and_scheduler(self, checkpoint):
            pass

    class _Trainer(AtomicCheckpointMixin, _Base):
        extra_state_attrs = ("_pir_cache", "skipped_nonfinite")

    ck = tmp_path / "checkpoint-1"
    ck.mkdir()
    marker = tmp_path / "pwned"
    _poison(ck / EXTRA_STATE, marker)
    _assert_poison_is_live(ck / EXTRA_STATE, marker)
    t = _Trainer()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        t._load_optimizer_and_scheduler(str(ck))
    assert not marker.exists() and not hasattr(t, "_pir_cache")

    torch.save({"_pir_cache": torch.arange(3.0), "skipped_nonfinite": 2}, ck / EXTRA_STATE)
    t._load_optimizer_and_scheduler(str(ck))
    assert t._pir_cache.tolist() == [0.0, 1.0, 2.0] and t.skipped_nonfinite == 2


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    from helpers import write_records
    tmp = tmp_path_factory.mktemp("resume")
    data = write_records(tmp / "train.jsonl", n=4)
    out = tmp / "run"
    rc, _, err = run_cli(["train", "--model", "tiny-random", "--data", str(data), "--task", "generic",
                          "--max-steps", "1", "--batch-size", "2", "--max-length", "128", "--save-steps", "1",
                          "--no-progress", "--output-dir", str(out)])
    assert rc == 0, err
    assert (out / "checkpoint-1" / "percontrast_state.pt").is_file()
    return data, out


# Every pickle-format file that ``train --resume`` reads: ours (percontrast_state.pt, read by the mixin) and the
# Trainer's own. Each is poisoned on its own; the resumed run must never run the payload.
@pytest.mark.parametrize("name", ["percontrast_state.pt", "optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_from_a_poisoned_checkpoint_never_runs_its_code(one_step_run, tmp_path, name):
    data, ref = one_step_run
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    target = out / "checkpoint-1" / name
    assert target.is_file(), sorted(p.name for p in target.parent.iterdir())
    marker = tmp_path / "pwned"
    _poison(target, marker)
    _assert_poison_is_live(target, marker)
    argv = ["train", "--model", "tiny-random", "--data", str(data), "--task", "generic", "--max-steps", "2",
            "--batch-size", "2", "--max-length", "128", "--save-steps", "1", "--no-progress",
            "--output-dir", str(out), "--resume"]
    try:
        rc, _, err = run_cli(argv)
    except Exception as e:  # noqa: BLE001 - an escaping exception is a refusal too
        rc, err = None, f"{type(e).__name__}: {e}"
    assert not marker.exists(), f"resuming ran the code in {name}"
    # refused outright by a weights-only load (ours in checkpointing.py; the Trainer's own via torch's default)
    assert rc == 2 and err.startswith("error: --resume") and err.count("\n") == 1, (rc, err[-2000:])
    assert "Weights only load failed" in err


def test_no_pickle_or_eval_or_unsafe_yaml():
    assert not _calls(r"\bimport pickle\b|\bpickle\.loads?\(|\bdill\b|\bcloudpickle\b")
    assert not _calls(r"(?<![.\w])eval\(|(?<![.\w])exec\(")
    assert not _calls(r"yaml\.(load|unsafe_load|full_load)\(|yaml\.Loader\b|yaml\.UnsafeLoader\b")
    assert _calls(r"yaml\.safe_load\(")          # the config reader uses the safe loader


def test_no_hardcoded_remote_code_or_pickle_weights():
    # every from_pretrained either forwards the user's flag or leaves transformers' default (False)
    assert not _calls(r"trust_remote_code\s*=\s*True")
    assert not _calls(r"use_safetensors\s*=\s*False")
    for name, lineno, line in _calls(r"\.from_pretrained\("):
        assert "trust_remote_code" not in line or "trust_remote_code=trust_remote_code" in line, line


def test_yaml_python_tags_do_not_run(tmp_path):
    from percontrast.config import read_yaml
    from percontrast.errors import UserError
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UserError, match="invalid YAML"):
        read_yaml(cfg)
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_the_flag(tmp_path, monkeypatch):
    import transformers

    from percontrast.models import load_model
    from percontrast.options import ModelDataOptions
    assert ModelDataOptions(data="x").trust_remote_code is False
    seen = []

    def fake(*args, **kwargs):
        seen.append((kwargs.get("trust_remote_code"), kwargs.get("use_safetensors", "unset")))
        raise OSError("stop here")

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    from percontrast.errors import UserError
    for flag in (False, True):
        with pytest.raises(UserError):
            load_model(str(d), trust_remote_code=flag)
    assert [s[0] for s in seen] == [False, True]
    assert all(s[1] is not False for s in seen)          # safetensors never switched off
    # the CLI default is off as well
    from percontrast.cli import build_parser
    args = build_parser().parse_args(["train", "--data", "x"])
    assert getattr(args, "trust_remote_code", False) is False


# -- HTML ---------------------------------------------------------------------------------------------------

PAYLOAD = ('<script>document.title="PWNED";document.body.setAttribute("data-pwned","1")</script>'
           '" onmouseover="document.title=\'PWNED\'" x="<img src=x onerror="document.title=\'PWNED\'">'
           "<iframe src=https://example.com></iframe>")


@pytest.fixture(scope="module")
def evil_page(tmp_path_factory):
    """``percontrast score`` on a record whose id, input, output and profile carry the payload, with a
    model directory whose path does too (it goes into the page title)."""
    from percontrast.models import load_model
    tmp = tmp_path_factory.mktemp("evil")
    model_dir = tmp / 'm"><img src=x onerror=alert(1)>'
    model, tok = load_model("tiny-random")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rec = {"id": "id-" + PAYLOAD, "input": "Write " + PAYLOAD, "output": "Hi " + PAYLOAD + " bye",
           "profile": [{"title": PAYLOAD, "text": "I like " + PAYLOAD}]}
    data = tmp / "evil.jsonl"
    data.write_text(json.dumps(rec) + "\n")
    out = tmp / "out"
    rc, _, err = run_cli(["score", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
                          "--max-length", "512"])
    assert rc == 0, err
    scores = json.loads((out / "scores.json").read_text())
    tokens = scores["examples"][0]["tokens"]
    assert any("<" in t for t in tokens) and any("script" in t for t in tokens)   # tokens carry markup
    return out / "heatmap.html", rec, tokens


def test_heatmap_escapes_everything_static(evil_page):
    page_path, rec, tokens = evil_page
    page = page_path.read_text(encoding="utf-8")
    _assert_inert(page)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "&lt;script&gt;" in page                          # shown as text


def test_heatmap_renderer_escapes_quotes_in_tokens():
    from percontrast.heatmap import render
    page = render([{"id": '"><script>x</script>', "input": '" onmouseover="x', "output": "o",
                    "tokens": ['"onmouseover=', "<script>", "'", "&amp;"], "pir": [1.0, -1.0, float("nan"), 0.0],
                    "weights": [1.0, 1.0, 1.0, 1.0]}], title='<title>"t"')
    _assert_inert(page)
    assert page.count("<title>") == 1 and "&lt;title&gt;" in page
    assert "&quot;onmouseover=" in page and "&amp;amp;" in page


def _chromium_dom(page: Path, tmp_path: Path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000", "--dump-dom", page.as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "<body" in p.stdout, p.stderr[-2000:]
    return p.stdout


def test_heatmap_in_headless_chromium(evil_page, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but chromium is missing: apt-get install -y chromium")
        pytest.skip("chromium not installed (apt-get install -y chromium); required when CI=true")
    page_path, rec, tokens = evil_page
    # A control page with a live script proves this Chromium runs scripts and that we would see it.
    control = tmp_path / "control.html"
    control.write_text("<!doctype html><html><head><title>t</title></head><body>"
                       "<script>document.body.setAttribute('data-pwned','1')</script></body></html>")
    assert 'data-pwned="1"' in _chromium_dom(control, tmp_path)

    dom = _chromium_dom(page_path, tmp_path)
    assert "PWNED" not in re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert 'data-pwned="1"' not in dom
    _assert_inert(dom)
    # the payload is on the page as visible text
    assert "&lt;script&gt;" in dom and "onmouseover=" in dom
