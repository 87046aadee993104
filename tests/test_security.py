"""Security: no remote code unless asked, no pickle, safe YAML, HTML pages that escape everything.

The HTML check renders real ``percontrast score`` output in headless Chromium (Debian package
``chromium``) and inspects the DOM after load: injected ``<script>`` / ``<img onerror>`` /
``" onmouseover=`` from records, profiles, ids and the model path must show up as text, never as
elements or attributes, and the page must reference nothing on the network. Without Chromium
the browser test is skipped, except under ``CI=true``, where it fails.
"""
from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT, run_cli

PKG = ROOT / "percontrast"
SOURCES = {p: p.read_text(encoding="utf-8") for p in sorted(PKG.rglob("*.py"))}
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _calls(pattern: str):
    rx = re.compile(pattern)
    return [(p.name, i + 1, line.strip()) for p, text in SOURCES.items()
            for i, line in enumerate(text.splitlines()) if rx.search(line)]


def test_torch_load_is_weights_only():
    calls = _calls(r"\btorch\.load\(")
    for name, lineno, line in calls:
        assert "weights_only=True" in line, f"{name}:{lineno}: {line}"


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


class _Elements(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]


def _parse(page: str) -> _Elements:
    p = _Elements()
    p.feed(page)
    return p


def _assert_inert(page: str):
    p = _parse(page)
    assert not {"script", "img", "iframe", "object", "embed", "link", "base", "form"} & set(p.tags), p.tags
    bad = [a for a in p.attrs if a[1].startswith("on") or a[1] == "data-pwned"]
    assert not bad, bad
    for tag, k, v in p.attrs:
        if k in ("src", "href", "action", "srcset", "poster", "data"):
            assert not re.search(r"https?:|^//", v.strip()), (tag, k, v)
        assert "url(" not in v.replace(" ", "").lower(), (tag, k, v)


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
