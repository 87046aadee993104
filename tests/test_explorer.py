"""The token explorer (``percontrast.heatmap.render``) in a real headless Chromium.

Driven over the DevTools protocol (``helpers.browser``: ``--remote-debugging-pipe``, standard library
only) with real input events: the mouse pointer is moved onto a token, keys are pressed, headers are
clicked; then the tooltip and table are read back from the DOM. Without Chromium the tests skip, except
under ``CI=true``, where they fail (as in test_security.py).

``PERCONTRAST_SCREENSHOTS=1`` also writes docs/img/explorer.png and docs/img/explorer-hover.png
(synthetic numbers, see ``_showcase``); normal runs write nothing into the tree.
"""
from __future__ import annotations

import math
import os
import random
import re
import time

import pytest

from helpers import ROOT
from helpers.browser import Browser, assert_inert_html, csp_of, require_chromium
from percontrast.heatmap import CSP, render

CLIP_MIN, CLIP_MAX = 0.8, 5.0
TIP_VALUES = "Array.from(document.querySelectorAll('#pc-tip [data-k]'), e => [e.dataset.k, e.textContent])"


def _example(i: int, n: int, rng: random.Random, top: bool = True, profile: bool = True) -> dict:
    words = "bike market figs stew coast lentil climb harbour pastry tram river garden chess violin".split()
    toks = [("" if j == 0 else " ") + rng.choice(words) for j in range(n)]
    lw = [-rng.uniform(0.01, 6) for _ in toks]
    lo = [-rng.uniform(0.01, 6) for _ in toks]
    pir = [a - b for a, b in zip(lw, lo)]
    ex = {"id": f"user{i % 3}-{i}", "input": f"Write note {i} about " + rng.choice(words), "output": "".join(toks),
          "tokens": toks, "pir": pir, "logp_with": lw, "logp_without": lo,
          "weights": [min(max(v, CLIP_MIN), CLIP_MAX) for v in pir], "entropy": [rng.uniform(0, 4) for _ in toks]}
    if profile:
        ex["profile"] = [f"Title: item {k}\n" + " ".join(rng.sample(words, 5)) for k in range(2)]
    if top:
        def cands():
            ps = sorted((rng.random() ** 3 for _ in range(7)), reverse=True)   # 7 given, 5 shown
            return [[" " + rng.choice(words) + str(k), p / 2.5] for k, p in enumerate(ps)]
        ex["top_with"] = [cands() for _ in toks]
        ex["top_without"] = [cands() for _ in toks]
    return ex


def _num(v, sign=False) -> str:
    """What the page must show for a value: 3 decimals, "+" on PIR."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return format(round(v, 3) + 0.0, "+.3f" if sign else ".3f")


def _pct_ok(shown: str, p: float) -> bool:
    """A probability shown as a percentage to 3 significant digits: within half a unit of the third digit."""
    pct = p * 100
    step = 10 ** (math.floor(math.log10(pct)) - 2)
    return shown.endswith("%") and abs(float(shown[:-1]) - pct) <= step / 2 * (1 + 1e-9) + 1e-12


@pytest.fixture(scope="module")
def browser():
    require_chromium()
    with Browser(width=1280, height=900) as b:
        yield b


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    rng = random.Random(0)
    examples = [_example(i, 30 + 7 * i, rng) for i in range(5)]
    examples.append(_example(5, 12, rng, top=False, profile=False))               # an old caller's example
    for key in ("logp_with", "logp_without", "weights", "entropy"):
        del examples[5][key]
    examples[2]["pir"][4] = float("nan")
    examples[2]["profile"] = []
    examples[2]["profile_removed"] = True
    path = tmp_path_factory.mktemp("explorer") / "page.html"
    path.write_text(render(examples, title="explorer test", clip_min=CLIP_MIN, clip_max=CLIP_MAX), encoding="utf-8")
    return path, examples


def _open(b: Browser, path) -> float:
    b.errors.clear()
    t = b.open(path.as_uri())
    assert b.eval("document.documentElement.dataset.ready") == "1", b.console
    return t


def test_page_renders_profile_input_legend_and_summary(browser, page):
    path, examples = page
    _open(browser, path)
    got = browser.eval("""(() => ({
        sections: document.querySelectorAll('section.ex').length,
        tokens: Array.from(document.querySelectorAll('.r'), r => r.children.length),
        profile: Array.from(document.querySelectorAll('#ex-0 .prof li'), e => e.textContent),
        profile2: document.querySelector('#ex-2 .prof').textContent,
        profile5: document.querySelector('#ex-5 .prof'),
        input: document.querySelector('#ex-1 .inp').textContent,
        response: document.querySelector('#ex-1 .r').textContent,
        legend: document.getElementById('legend').textContent,
        share: document.getElementById('share').textContent,
        top: Array.from(document.querySelectorAll('#pc-top tbody tr'), r => [r.cells[2].textContent,
             r.cells[3].textContent, r.querySelector('a').getAttribute('href')]),
        targets: Array.from(document.querySelectorAll('#pc-top a'), a => {
             const t = document.querySelector(a.getAttribute('href')); return t && t.textContent; }),
        tabbable: document.querySelectorAll('.r > [tabindex="0"]').length,
    }))()""")
    assert got["sections"] == len(examples)
    assert got["tokens"] == [len(e["tokens"]) for e in examples]
    assert got["profile"] == examples[0]["profile"]
    assert "No profile items in the prompt" in got["profile2"] and "cut the whole profile" in got["profile2"]
    assert got["profile5"] is None                     # no profile key: nothing claimed
    assert got["input"] == examples[1]["input"] and got["response"] == examples[1]["output"]
    assert "blue\u2013orange diverging" in got["legend"] and "colour blindness" in got["legend"]
    assert "Clip [m, M] = [0.8, 5]" in got["legend"]
    pirs = [v for e in examples for v in e["pir"]]
    above = sum(v > CLIP_MIN for v in pirs if math.isfinite(v))
    assert f"{above} of {len(pirs)} tokens ({above / len(pirs):.1%}) have PIR > m = 0.8" in got["share"]
    # the 20 most personal tokens, highest first, each linking to its token in its example
    hot = sorted(((v, i, j) for i, e in enumerate(examples) for j, v in enumerate(e["pir"]) if math.isfinite(v)),
                 key=lambda h: (-h[0], h[1], h[2]))[:20]
    assert [r[0] for r in got["top"]] == [_num(v, True) for v, _, _ in hot]
    assert [(r[1], r[2]) for r in got["top"]] == [(examples[i]["id"], f"#t{i}-{j}") for _, i, j in hot]
    assert got["targets"] == [examples[i]["tokens"][j] for _, i, j in hot]
    assert got["tabbable"] == len(examples)           # roving tabindex: one Tab stop per response
    assert browser.errors == []


def _tip(b: Browser) -> dict:
    return {"hidden": b.eval("document.getElementById('pc-tip').hidden"), "values": dict(b.eval(TIP_VALUES)),
            "text": b.eval("document.getElementById('pc-tip').textContent"),
            "cands": b.eval("Array.from(document.querySelectorAll('#pc-tip .cand tbody tr'), r => "
                            "Array.from(r.cells, c => c.textContent))")}


def _check_tip(tip: dict, ex: dict, j: int):
    assert not tip["hidden"]
    v = tip["values"]
    assert v["pir"] == _num(ex["pir"][j], sign=True)
    assert v["logp_with"] == _num(ex["logp_with"][j]) and v["logp_without"] == _num(ex["logp_without"][j])
    assert v["weight"] == _num(ex["weights"][j]) and v["entropy"] == _num(ex["entropy"][j])
    assert f"example {ex['id']} \u00b7 token {j + 1} of {len(ex['tokens'])}" in tip["text"]
    assert len(tip["cands"]) == 5                      # 7 candidates given, the top 5 shown
    for r, row in enumerate(tip["cands"]):
        (tw, pw), (to, po) = ex["top_with"][j][r], ex["top_without"][j][r]
        assert row[0] == str(r + 1), row
        assert (row[1], row[3]) == (tw.replace("\n", "\u21b5"), to.replace("\n", "\u21b5")), row
        assert _pct_ok(row[2], pw) and _pct_ok(row[4], po), (row, pw, po)


def test_hovering_a_token_shows_its_numbers_and_top5(browser, page):
    path, examples = page
    _open(browser, path)
    for i, j in [(1, 7), (3, 0), (4, 57)]:
        browser.hover(*browser.center(f"document.querySelector('#ex-{i} .r').children[{j}]"))
        _check_tip(_tip(browser), examples[i], j)
        assert browser.eval("document.querySelector('[aria-describedby=pc-tip]') === "
                            f"document.querySelector('#ex-{i} .r').children[{j}]")
    browser.hover(5, 5)                                  # pointer leaves: tooltip goes
    assert _tip(browser)["hidden"]
    browser.click(*browser.center("document.querySelector('#ex-1 .r').children[2]"))
    browser.hover(5, 5)                                  # a clicked token keeps its numbers shown
    _check_tip(_tip(browser), examples[1], 2)
    browser.key("Escape", keycode=27)
    assert _tip(browser)["hidden"]
    # an old caller's example: no log-probs, weights or candidate lists; what is there is shown
    browser.hover(*browser.center("document.querySelector('#ex-5 .r').children[3]"))
    tip = _tip(browser)
    assert tip["values"] == {"pir": _num(examples[5]["pir"][3], True), "logp_with": "n/a", "logp_without": "n/a",
                             "weight": "n/a"}
    assert "not recorded" in tip["text"] and tip["cands"] == []
    # a non-finite PIR
    browser.hover(*browser.center("document.querySelector('#ex-2 .r').children[4]"))
    assert _tip(browser)["values"]["pir"] == "n/a"
    assert browser.errors == []


def test_keyboard_focus_shows_the_same(browser, page):
    path, examples = page
    _open(browser, path)
    browser.hover(5, 5)
    browser.eval("document.querySelector('#ex-2 .r').children[0].focus()")   # the response's Tab stop
    _check_tip(_tip(browser), examples[2], 0)
    for _ in range(6):
        browser.key("ArrowRight", keycode=39)
    browser.key("ArrowLeft", keycode=37)
    assert browser.eval("document.activeElement === document.querySelector('#ex-2 .r').children[5]")
    _check_tip(_tip(browser), examples[2], 5)
    browser.key("End", keycode=35)
    _check_tip(_tip(browser), examples[2], len(examples[2]["tokens"]) - 1)
    browser.key("Escape", keycode=27)
    assert _tip(browser)["hidden"]
    # Tab leaves the response for the next one: a single Tab stop per response, on the token last visited
    browser.key("Tab", keycode=9)
    assert browser.eval("document.activeElement === document.querySelector('#ex-3 .r').children[0]")
    _check_tip(_tip(browser), examples[3], 0)
    assert browser.eval("document.querySelectorAll('#ex-2 .r > [tabindex=\"0\"]').length") == 1
    assert browser.errors == []


def _column(b: Browser, k: int) -> list[str]:
    return b.eval(f"Array.from(document.querySelectorAll('#pc-means tbody tr'), r => r.cells[{k}].textContent)")


def test_mean_pir_table_sorts_by_clicking_headers(browser, page):
    path, examples = page
    _open(browser, path)
    means = [sum(v for v in e["pir"] if math.isfinite(v)) / sum(math.isfinite(v) for v in e["pir"]) for e in examples]
    assert _column(browser, 3) == [_num(m, True) for m in means]          # file order first
    button = "document.querySelector('#pc-means th button[data-k=\"{}\"]')"
    browser.click(*browser.center(button.format(3)))                       # mean PIR: highest first
    order = sorted(range(len(examples)), key=lambda i: -means[i])
    assert _column(browser, 0) == [str(i + 1) for i in order]
    assert browser.eval("document.querySelectorAll('#pc-means th')[3].getAttribute('aria-sort')") == "descending"
    browser.click(*browser.center(button.format(3)))                       # again: lowest first
    assert _column(browser, 0) == [str(i + 1) for i in reversed(order)]
    assert browser.eval("document.querySelectorAll('#pc-means th')[3].getAttribute('aria-sort')") == "ascending"
    browser.click(*browser.center(button.format(1)))                       # example id, as text
    assert _column(browser, 1) == sorted(e["id"] for e in examples)
    assert browser.eval("document.querySelectorAll('#pc-means th')[3].getAttribute('aria-sort')") == "none"
    browser.click(*browser.center(button.format(0)))                       # back to file order
    assert _column(browser, 0) == [str(i + 1) for i in range(len(examples))]
    assert browser.errors == []


# -- hostile text ------------------------------------------------------------------------------------------

ATTACKS = [
    '<script>document.title="PWNED";window.pwned=1</script>',
    '"onmouseover="document.title=\'PWNED\'" x="',
    "</script><script>window.pwned=1;document.body.appendChild(document.createElement('pwned'))</script>",
    "<!--<script>",
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">",
    "</script><!--",
    "\u2028\u2029;window.pwned=1//",
    "\\u003c/script\\u003e",          # a literal backslash-u text must stay literal
    "]]></style><style>body{display:none}</style>",
    "&lt;&amp;&#x3c;",
]


def _hostile_page(tmp_path, script_edit=None):
    rng = random.Random(1)
    ex = _example(0, len(ATTACKS), rng)
    ex.update(id="id-" + ATTACKS[2], input="input " + ATTACKS[0] + ATTACKS[3], tokens=list(ATTACKS),
              output="".join(ATTACKS), profile=[a + " profile" for a in ATTACKS])
    ex["top_with"] = [[[a, 0.5], [ATTACKS[(k + 1) % len(ATTACKS)], 0.25]] for k, a in enumerate(ATTACKS)]
    calm = _example(1, 20, rng)
    html = render([ex, calm], title="hostile test")
    if script_edit:
        html = script_edit(html)
    path = tmp_path / "hostile.html"
    path.write_text(html, encoding="utf-8")
    return path, ex, html


def _pwned(b: Browser) -> dict:
    return b.eval("""(() => ({title: document.title, flag: typeof window.pwned,
        attr: document.querySelectorAll('[data-pwned]').length, el: document.querySelectorAll('pwned').length,
        scripts: document.scripts.length, imgs: document.images.length,
        styles: document.querySelectorAll('style').length,
        hidden: getComputedStyle(document.body).display}))()""")


def test_static_pages_are_inert_with_an_exact_csp(page, tmp_path):
    """Without a browser: only the JSON block and the hashed script; no style or event attributes; the data
    block cannot end itself or open a comment."""
    for html in (page[0].read_text(encoding="utf-8"), _hostile_page(tmp_path)[2]):
        assert_inert_html(html)
        assert csp_of(html) == CSP and "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
        assert " style=" not in html and "<style>" in html and html.count("<style") == 1
        data = html[html.index("<script type='application/json'"):]
        data = data[data.index(">") + 1:data.index("</script>")]
        assert not set("<>&\u2028\u2029") & set(data)
        assert "<!--" not in html


def test_hostile_text_is_shown_and_never_runs(browser, tmp_path):
    path, ex, html = _hostile_page(tmp_path)
    _open(browser, path)
    clean = {"title": "hostile test", "flag": "undefined", "attr": 0, "el": 0, "scripts": 2, "imgs": 0,
             "styles": 1, "hidden": "block"}
    assert _pwned(browser) == clean
    shown = browser.eval("""(() => ({
        tokens: Array.from(document.querySelector('#ex-0 .r').children, t => t.textContent),
        profile: Array.from(document.querySelectorAll('#ex-0 .prof li'), e => e.textContent),
        input: document.querySelector('#ex-0 .inp').textContent,
        id: document.querySelector('#ex-0 h2').textContent}))()""")
    assert shown["tokens"] == [a.replace("\n", "\u21b5\n") for a in ATTACKS]
    assert shown["profile"] == ex["profile"] and shown["input"] == ex["input"]
    assert shown["id"] == f"Example 1: {ex['id']}"
    for j, attack in enumerate(ATTACKS):                       # hover every hostile token: real mouse events
        browser.hover(*browser.center(f"document.querySelector('#ex-0 .r').children[{j}]"))
        tip = _tip(browser)
        assert tip["cands"][0][1] == attack and tip["cands"][1][1] == ATTACKS[(j + 1) % len(ATTACKS)]
        assert f"example {ex['id']}" in tip["text"]
        assert _pwned(browser) == clean
    assert browser.errors == [], browser.errors                # not even a blocked attempt (CSP reports those)
    # string-to-markup sinks are closed: Trusted Types make innerHTML with a string throw
    with pytest.raises(Exception, match="TrustedHTML"):
        browser.eval("document.body.innerHTML = '<b>x</b>'")


def test_only_the_hashed_script_runs(browser, tmp_path):
    """Control for the CSP: the same page with its script changed by one space does not run it (and the
    browser reports the block), so it is the hash that lets the real script run, nothing looser."""
    path, _, html = _hostile_page(tmp_path, lambda h: h.replace('"use strict";', '"use strict"; ', 1))
    browser.errors.clear()
    browser.open(path.as_uri())
    assert browser.eval("document.documentElement.dataset.ready") is None
    assert any("Content Security Policy" in e for e in browser.errors), browser.console
    browser.errors.clear()


# -- 1,000 examples ---------------------------------------------------------------------------------------

# Measured on the 2-vCPU "AMD EPYC" VM that runs this suite, Chromium 156, 2026-11-28, for this page
# (9.3 MB): navigation to load event, median 0.71 s and 0.90 s in two runs of 7 loads (0.57-1.16 s, load
# average 1.4-1.6); with other jobs on the 2 cores (load average 4-6) 0.8-2.3 s (docs/explorer.md). The bound
# is about 10x the typical load and 4x the worst seen: timings on shared machines are noisy, while a regression to
# per-token tooltip markup or a quadratic script would still cross it. The best of two loads is compared.
LOAD_BUDGET_S = 10.0


def test_thousand_examples_load_within_budget(browser, tmp_path):
    rng = random.Random(2)
    templates = [_example(i, 60, rng) for i in range(10)]        # 1,000 examples from 10 shapes (fast to make)
    examples = [dict(templates[i % 10], id=f"user{i % 50}-{i}") for i in range(1000)]
    t0 = time.perf_counter()
    html = render(examples, title="1,000 examples")
    render_s = time.perf_counter() - t0
    path = tmp_path / "big.html"
    path.write_text(html, encoding="utf-8")
    size = len(html.encode("utf-8"))
    assert size / 60_000 < 200, size                  # bytes per token; per-token tooltip HTML would be ~600+
    loads = []
    for _ in range(2):
        browser.open("about:blank")
        loads.append(_open(browser, path))
    print(f"\n1,000 examples x 60 tokens, top-5 lists: {size / 1e6:.2f} MB, render {render_s:.2f} s, "
          f"load {', '.join(f'{t:.2f}' for t in loads)} s")
    assert min(loads) < LOAD_BUDGET_S, loads
    # still usable: the last example's token shows its numbers, and the table sorts
    browser.hover(*browser.center("document.querySelector('#ex-999 .r').children[59]"))
    _check_tip(_tip(browser), examples[999], 59)
    browser.click(*browser.center("document.querySelector('#pc-means th button[data-k=\"3\"]')"))
    first = browser.eval("document.querySelector('#pc-means tbody tr').cells[3].textContent")
    best = max(sum(e["pir"]) / len(e["pir"]) for e in templates)
    assert first == _num(best, True)
    assert browser.errors == []


# -- screenshots for docs/explorer.md ----------------------------------------------------------------------

def _showcase() -> list[dict]:
    """Three made-up messages of one user (synthetic numbers: profile words get a high PIR), for the
    screenshots only."""
    rng = random.Random(3)
    profile = ["Subject: Saturday ride\nLeaving from the Cais do Sodr\u00e9 at 8, bring the panniers. Falafel after!",
               "Subject: Re: allotment\nThe courgettes are mad this year, take some for the lentil stew."]
    personal = {"ride", "bike", "Sintra", "falafel", "lentil", "courgettes", "panniers", "Cheers", "Cais"}
    texts = [("Write to Ana about the weekend.",
              "Hi Ana,\nFancy a ride to Sintra on Saturday? I'll bring the panniers and we can grab falafel "
              "after.\nCheers, Jo"),
             ("Reply to the allotment group.", "Thanks all! I have far too many courgettes again, so lentil "
              "stew for everyone on Sunday.\nCheers, Jo"),
             ("Write to your landlord about the boiler.", "Dear Mr Silva,\nThe boiler stopped working this "
              "morning. Could someone come and look at it this week?\nKind regards, Jo")]
    fillers = [" the", " a", " to", " and", " on", " we", " I", ",", ".", " for", " this", " it"]
    out = []
    for i, (inp, text) in enumerate(texts):
        toks = re.findall(r"\n| ?[\w']+| ?[^\w\s]", text)
        lw, lo, tw, to = [], [], [], []
        for t in toks:
            hot = t.strip() in personal
            a = -rng.uniform(0.1, 1.2) if hot else -rng.uniform(0.2, 3.5)
            b = a - (rng.uniform(2.0, 5.5) if hot else rng.uniform(-1.0, 0.9))
            lw.append(a)
            lo.append(b)
            others = rng.sample([f for f in fillers if f != t], 4)
            pw, po = math.exp(a), math.exp(b)
            rest_w = sorted((rng.uniform(0, 1 - pw) / 3 for _ in others), reverse=True)
            rest_o = sorted((rng.uniform(0, 1 - po) / 2 for _ in others), reverse=True)
            tw.append(sorted([[t, pw]] + [[o, p] for o, p in zip(others, rest_w)], key=lambda c: -c[1]))
            to.append(sorted([[t, po]] + [[o, p] for o, p in zip(others, rest_o)], key=lambda c: -c[1])[:5])
        pir = [x - y for x, y in zip(lw, lo)]
        out.append({"id": f"jo-{i + 1}", "input": inp, "output": text, "tokens": toks, "pir": pir,
                    "logp_with": lw, "logp_without": lo, "weights": [min(max(v, 0.8), 5.0) for v in pir],
                    "entropy": [rng.uniform(0.5, 4) for _ in toks], "profile": profile,
                    "top_with": tw, "top_without": to})
    return out


@pytest.mark.skipif(not os.environ.get("PERCONTRAST_SCREENSHOT_DEMO"),
                    reason="set PERCONTRAST_SCREENSHOT_DEMO=<a demo-output folder>")
def test_write_demo_screenshots(browser):
    """The README's screenshots, from a real `python run.py demo` output (SmolLM2-135M after its PerCE
    fine-tune): the explorer with the most personal token of the first example hovered, and the
    training report. ``PERCONTRAST_SCREENSHOT_DEMO=demo-output pytest tests/test_explorer.py``."""
    from pathlib import Path
    demo = Path(os.environ["PERCONTRAST_SCREENSHOT_DEMO"]).resolve()
    img = ROOT / "docs" / "img"
    _open(browser, demo / "heatmap_after.html")
    browser.eval("document.getElementById('ex-0').scrollIntoView()")
    # the first example's token with the highest colour level on the orange (PIR > 0) side
    j = browser.eval("(() => { const t = Array.from(document.querySelectorAll('#ex-0 .r > *'));"
                     " const lv = e => { const m = /o(\\d)/.exec(e.className); return m ? +m[1] : 0; };"
                     " return t.reduce((b, e, i) => lv(e) > lv(t[b]) ? i : b, 0); })()")
    browser.hover(*browser.center(f"document.querySelector('#ex-0 .r').children[{j}]"))
    tip = _tip(browser)
    assert not tip["hidden"] and "PIR" in tip["text"] and tip["cands"], tip
    browser.screenshot(img / "explorer-hover.png")
    browser.open((demo / "model" / "report.html").as_uri())
    assert "loss" in browser.eval("document.body.textContent")
    browser.eval("Array.from(document.querySelectorAll('h2')).find(h => h.textContent.includes('Per step'))"
                 ".scrollIntoView()")   # the plots, not the settings table
    browser.screenshot(img / "report.png")
    assert (img / "explorer-hover.png").stat().st_size > 10_000 and (img / "report.png").stat().st_size > 10_000


@pytest.mark.skipif(os.environ.get("PERCONTRAST_SCREENSHOTS") != "1", reason="set PERCONTRAST_SCREENSHOTS=1")
def test_write_screenshots(browser, tmp_path):
    examples = _showcase()
    path = tmp_path / "showcase.html"
    path.write_text(render(examples, title="PerContrast scores: an example"), encoding="utf-8")
    _open(browser, path)
    img = ROOT / "docs" / "img"
    browser.eval("window.scrollTo(0, 0)")
    browser.screenshot(img / "explorer.png")
    j = next(j for j, t in enumerate(examples[0]["tokens"]) if t.strip() == "falafel")
    browser.eval("document.getElementById('ex-0').scrollIntoView()")
    browser.hover(*browser.center(f"document.querySelector('#ex-0 .r').children[{j}]"))
    _check_tip(_tip(browser), examples[0], j)
    browser.screenshot(img / "explorer-hover.png")
    assert (img / "explorer.png").stat().st_size > 10_000 and (img / "explorer-hover.png").stat().st_size > 10_000


# -- a page of contrastively decoded outputs (generate --explain) --------------------------------------------

def _contrast_page(tmp_path):
    rng = random.Random(2)
    examples = [_example(i, 16, rng) for i in range(2)]
    for ex in examples:
        del ex["weights"]                                  # generated outputs have no PerCE weights
        ex["changed"] = [j % 4 == 1 for j in range(16)]
        ex["plain_tokens"] = [f" plain{j}" if c else t for j, (t, c) in enumerate(zip(ex["tokens"], ex["changed"]))]
    examples[0]["plain_tokens"][1] = ATTACKS[0]            # a hostile plain pick is text too
    examples[0]["pir"][5] = 2.5                            # changed and PIR > m: overline and bar together
    html = render(examples, title="contrast test", clip_min=CLIP_MIN, clip_max=CLIP_MAX, counterfactual="swap",
                  contrast={"alpha": 1.5, "plausibility": 0.1})
    path = tmp_path / "contrast.html"
    path.write_text(html, encoding="utf-8")
    return path, examples, html


def test_contrast_page_static(tmp_path):
    """Without a browser: inert, the same CSP, one marked span per changed token, the legend states the
    contrast (alpha, guard, the other user's profile as the counterfactual) and the summary counts changes."""
    _, examples, html = _contrast_page(tmp_path)
    assert_inert_html(html)
    assert csp_of(html) == CSP
    assert html.count("<span class='c ") + html.count("<span class=c") == sum(sum(e["changed"]) for e in examples)
    assert "alpha = 1.5" in html and "another user&#x27;s profile, input" in html
    assert "8 of 32 generated tokens (25.0%) were changed by the contrast" in html
    assert html.count("4 changed by the contrast") == 2


def test_contrast_page_marks_changed_tokens_and_shows_the_plain_pick(browser, tmp_path):
    path, examples, _ = _contrast_page(tmp_path)
    _open(browser, path)
    marks = browser.eval("Array.from(document.querySelectorAll('#ex-0 .r > span'), "
                         "t => [getComputedStyle(t).textDecorationLine, getComputedStyle(t).boxShadow])")
    assert [m[0] == "overline" for m in marks] == examples[0]["changed"]
    assert marks[5][1] != "none"                           # the PIR > m bar survives the changed mark
    browser.hover(*browser.center("document.querySelector('#ex-0 .r').children[1]"))
    tip = _tip(browser)
    assert tip["values"]["plain"] == ATTACKS[0] + " (changed by the contrast)"
    assert "weight" not in tip["values"]                   # no PerCE weight row on a generation page
    assert "log p(token | other user's profile, input)" in tip["text"] and "other user's profile" in tip["text"]
    assert tip["values"]["pir"] == _num(examples[0]["pir"][1], True)
    browser.hover(5, 5)                                    # the tooltip away first: it may cover the token
    browser.hover(*browser.center("document.querySelector('#ex-1 .r').children[5]"))
    assert _tip(browser)["values"]["plain"] == " plain5 (changed by the contrast)"
    browser.hover(5, 5)
    browser.hover(*browser.center("document.querySelector('#ex-1 .r').children[2]"))
    assert _tip(browser)["values"]["plain"] == "the same token"
    assert browser.eval("typeof window.pwned") == "undefined" and browser.eval("document.title") == "contrast test"
    assert browser.errors == []
