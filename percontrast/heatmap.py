"""The token explorer: one self-contained HTML page of per-token PIR (``heatmap.html``).

Per example: the profile items as they stood in the prompt, the input, and the response with every
token coloured by PIR on a blue-orange diverging scale (readable with red-green colour blindness;
tokens with PIR > m are also marked by a bar, so colour is never the only cue). Hovering or focusing
(Tab) a token shows its PIR, both log-probs, its PerCE weight and, when scoring kept them
(``--top-k``), the top candidates with and without the profile. At the top: the most personal
tokens of the file, a table of mean PIR per example (sortable by clicking a header) and the share
of tokens above the clip m. Details: docs/explorer.md.

A page of generated outputs (``percontrast generate --contrast-alpha A --explain FILE.html``, the
``contrast`` argument) colours each generated token by its PIR at decode time and marks (overline)
every token the contrast changed; hovering it shows the token plain greedy decoding (alpha 0) would
have picked after the same prefix.

How the page stays safe with hostile text (profiles, responses, tokens, ids such as ``<script>``,
``"onmouseover=``, ``</script>``, ``<!--``):

* Everything in the HTML goes through ``html.escape`` (quotes included); no ``style`` or event
  attributes are written at all.
* Per-token numbers and the candidate lists travel as JSON in one ``<script type="application/json">``
  block (not executed), with ``<``, ``>``, ``&``, U+2028 and U+2029 escaped as ``\\uXXXX``, so no
  text can end the block or open a comment.
* One constant inline script (``_SCRIPT``, no data in it) reads that block with ``JSON.parse`` and
  inserts values only through ``textContent``. The Content-Security-Policy allows exactly that
  script and the one constant ``<style>`` element by their sha256 hashes and nothing else
  (``default-src 'none'``, no ``'unsafe-inline'``), and ``require-trusted-types-for 'script'``
  makes any ``innerHTML``-style string-to-markup assignment throw. The page loads nothing.

Size: the per-token data is in the JSON block once (candidate strings deduplicated into one
vocabulary) instead of repeated tooltip markup; a 1,000-example page with 60 tokens each and top-5
lists is about 8 MB (docs/explorer.md has the measured load time).
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import math

# colour levels: |PIR| >= EDGES[k] * scale gives level k + 1; level 0 (near zero) is uncoloured.
EDGES = (0.05, 0.25, 0.5, 0.75, 1.0)
ORANGE = ("#fde4c3", "#fdc086", "#f99d45", "#e0701a", "#b35806")   # PIR > 0: the profile made it likelier
BLUE = ("#dbe9f6", "#a9cde8", "#6baed6", "#3a84c0", "#1f5a99")     # PIR < 0: less likely
TOP_CANDIDATES = 5   # candidates shown per distribution in the tooltip

_STYLE = (
    "body{font:15px/1.55 system-ui,sans-serif;max-width:66em;margin:1.2em auto;padding:0 1em;color:#111;"
    "background:#fff}h1{font-size:1.45em}h2{font-size:1.12em;margin:.2em 0}h3{font-size:1em;margin:.8em 0 .3em}"
    ".meta{color:#444;font-size:90%}.legend{background:#f6f6f6;border:1px solid #ccc;padding:.5em .8em}"
    ".sw{display:inline-block;min-width:4.6em;text-align:center;border:1px solid #999;margin:0 2px 2px 0;"
    "font-size:80%}"
    ".ex{border-top:1px solid #bbb;padding:.7em 0;content-visibility:auto;contain-intrinsic-size:auto 22em}"
    ".prof ol{margin:.2em 0 .4em;padding-left:1.6em}.prof li,.inp{white-space:pre-wrap;background:#f6f6f6;"
    "max-height:9em;overflow:auto;padding:.15em .4em;margin:.15em 0}"
    ".r{white-space:pre-wrap;line-height:1.95;border:1px solid #ddd;padding:.3em .4em}"
    ".r>span{border-radius:2px;cursor:help}.r>span:focus{outline:2px solid #000;outline-offset:1px}"
    ".r>span[class$=h]{box-shadow:inset 0 -3px #000}.r>span.o5h{box-shadow:inset 0 -3px #000,inset 0 -5px #fff}"
    ".r>span:target{outline:3px dashed #000;outline-offset:2px}"
    + "".join(f".{s}{k + 1},.{s}{k + 1}h{{background:{c}}}" for s, cs in (("o", ORANGE), ("b", BLUE))
              for k, c in enumerate(cs))
    + ".o5,.o5h,.b5,.b5h{color:#fff}.n{outline:1px dashed #777}.sw.h,.sw.o3h{box-shadow:inset 0 -3px #000}"
    "table{border-collapse:collapse}td,th{padding:.12em .6em;text-align:left;vertical-align:top}"
    ".num{text-align:right;font-variant-numeric:tabular-nums}tbody tr:nth-child(even){background:#f4f4f4}"
    ".scroll{max-height:22em;overflow:auto;border:1px solid #ccc;display:inline-block}"
    "thead th{position:sticky;top:0;background:#e8e8e8}"
    "th button{font:inherit;font-weight:bold;border:0;background:none;cursor:pointer;padding:0;color:#00e}"
    "th[aria-sort=ascending] button::after{content:' \\25B2'}th[aria-sort=descending] button::after{content:' \\25BC'}"
    ".cols{display:flex;flex-wrap:wrap;gap:0 2.5em;align-items:flex-start}"
    ".tk{white-space:pre;font-family:ui-monospace,monospace;background:#f1f1f1;border:1px solid #ccc;"
    "padding:0 .2em;border-radius:2px}"
    "#pc-tip{position:absolute;z-index:10;max-width:36em;background:#fff;border:1px solid #333;border-radius:4px;"
    "padding:.45em .7em;box-shadow:0 2px 10px rgba(0,0,0,.3);font-size:13px;line-height:1.4}"
    "#pc-tip[hidden]{display:none}"
    "#pc-tip td{padding:0 .5em 0 0}#pc-tip .cand{margin-top:.3em}#pc-tip .cand th{font-weight:normal;color:#444}"
    ".c{text-decoration:overline solid #000 2px}"
)

# The page's only script. It is constant (no data is ever pasted into it), so its hash is too.
_SCRIPT = r"""(() => {
"use strict";
let D0 = null;   // parsed on first use: the page shows before the data is read
const data = () => D0 || (D0 = JSON.parse(document.getElementById("pc-data").textContent));
const tip = document.getElementById("pc-tip");
let cur = null;
const el = (tag, text, cls) => {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
};
const num = (v, sign) => v === null || v === undefined ? "n/a" : (sign && v >= 0 ? "+" : "") + v.toFixed(3);
const pct = p => p.toPrecision(3) + "%";
const row = (tbody, label, value, key) => {
  const tr = tbody.appendChild(el("tr"));
  tr.appendChild(el("td", label));
  tr.appendChild(el("td", value, "num")).dataset.k = key;
};
const at = (a, j) => a ? a[j] : null;
function fill(t, x, j) {
  const D = data(), E = D.x[x];
  tip.replaceChildren();
  const head = tip.appendChild(el("div"));
  head.append(el("span", t.textContent.replace(/\n/g, ""), "tk"), " example ", el("b", E.id),
              ` \u00b7 token ${j + 1} of ${E.p.length}`);
  const kv = tip.appendChild(el("table")).appendChild(el("tbody"));
  row(kv, "PIR (nats)", num(E.p[j], true), "pir");
  row(kv, "log p(token | profile, input)", num(at(E.a, j)), "logp_with");
  row(kv, D.cf ? "log p(token | other user's profile, input)" : "log p(token | input)", num(at(E.b, j)),
      "logp_without");
  if (!D.g || E.w) row(kv, `PerCE weight = clip(PIR, ${D.m}, ${D.M})`, num(at(E.w, j)), "weight");
  if (E.e) row(kv, "entropy with profile (nats)", num(E.e[j]), "entropy");
  if (E.q) {
    const q = E.q[j], tr = kv.appendChild(el("tr"));
    tr.appendChild(el("td", "plain greedy pick (alpha 0, same prefix)"));
    const c = tr.appendChild(el("td"));
    c.dataset.k = "plain";
    if (q === null) c.textContent = "the same token";
    else c.append(el("span", D.v[q].replace(/\n/g, "\u21b5"), "tk"), " (changed by the contrast)");
  }
  const lists = [at(E.tw, j), at(E.to, j)];
  if (!lists[0] && !lists[1]) {
    tip.appendChild(el("div", "Top candidates: not recorded (scores made without --top-k).", "meta"));
    return;
  }
  const table = tip.appendChild(el("table", undefined, "cand"));
  const hr = table.appendChild(el("thead")).appendChild(el("tr"));
  for (const h of ["#", "with profile", "p", D.cf ? "other user's profile" : "without profile", "p"]) {
    hr.appendChild(el("th", h));
  }
  const body = table.appendChild(el("tbody"));
  const n = Math.max(...lists.map(l => l ? l.length / 2 : 0));
  for (let i = 0; i < n; i++) {
    const tr = body.appendChild(el("tr"));
    tr.appendChild(el("td", String(i + 1), "num"));
    for (const [s, l] of [["w", lists[0]], ["o", lists[1]]]) {
      const has = l && 2 * i < l.length;
      const c = tr.appendChild(el("td"));
      if (has) c.appendChild(el("span", D.v[l[2 * i]].replace(/\n/g, "\u21b5"), "tk"));
      c.dataset.k = "tok_" + s;
      tr.appendChild(el("td", has ? pct(l[2 * i + 1]) : "", "num")).dataset.k = "p_" + s;
    }
  }
}
function place(t) {
  tip.hidden = false;
  const b = t.getBoundingClientRect(), w = tip.offsetWidth, h = tip.offsetHeight;
  const left = Math.max(4, Math.min(b.left, document.documentElement.clientWidth - w - 4));
  let top = b.bottom + 6;
  if (top + h > window.innerHeight && b.top - h - 6 > 0) top = b.top - h - 6;
  tip.style.left = left + window.scrollX + "px";
  tip.style.top = top + window.scrollY + "px";
}
const token = e => {
  const t = e.target, r = t && t.parentNode;
  return r && r.classList && r.classList.contains("r") ? t : null;
};
function show(t) {
  if (cur && cur !== t) cur.removeAttribute("aria-describedby");
  const r = t.parentNode;
  fill(t, +r.dataset.x, Array.prototype.indexOf.call(r.children, t));
  cur = t;
  t.setAttribute("aria-describedby", "pc-tip");
  place(t);
}
function hide() {
  tip.hidden = true;
  if (cur) cur.removeAttribute("aria-describedby");
  cur = null;
}
const focused = () => token({target: document.activeElement});
function go(n) {
  const old = n.parentNode.querySelector("[tabindex='0']");
  if (old && old !== n) old.tabIndex = -1;
  n.tabIndex = 0;
  n.focus();
}
document.addEventListener("mouseover", e => { const t = token(e); if (t) show(t); });
document.addEventListener("mouseout", e => {
  const t = token(e);
  if (t && t === cur) { const f = focused(); if (f) show(f); else hide(); }
});
document.addEventListener("click", e => { const t = token(e); if (t) go(t); });
document.addEventListener("focusin", e => { const t = token(e); if (t) show(t); });
document.addEventListener("focusout", e => { if (token(e) && token(e) === cur) hide(); });
document.addEventListener("keydown", e => {
  if (e.key === "Escape") { hide(); return; }
  const t = token(e);
  if (!t) return;
  const n = {ArrowRight: t.nextElementSibling, ArrowLeft: t.previousElementSibling,
             Home: t.parentNode.firstElementChild, End: t.parentNode.lastElementChild}[e.key];
  if (n) { e.preventDefault(); go(n); }
});

const table = document.getElementById("pc-means");
const tbody = table.tBodies[0], rows = Array.from(tbody.rows);
const key = (i, k) => k === 0 ? i : k === 1 ? data().x[i].id : data().s[i][k - 2];
table.tHead.addEventListener("click", e => {
  const b = e.target.closest("button");
  if (!b) return;
  const k = +b.dataset.k, th = b.parentNode, was = th.getAttribute("aria-sort");
  const asc = was === "none" ? k < 2 : was !== "ascending";
  const order = rows.map((_, i) => i).sort((p, q) => {
    const u = key(p, k), v = key(q, k);
    if (u === null || v === null) return (u === null) - (v === null) || p - q;
    const c = u < v ? -1 : u > v ? 1 : 0;
    return (asc ? c : -c) || p - q;
  });
  tbody.append(...order.map(i => rows[i]));
  for (const h of table.tHead.rows[0].cells) h.setAttribute("aria-sort", "none");
  th.setAttribute("aria-sort", asc ? "ascending" : "descending");
});
document.documentElement.dataset.ready = "1";
})();
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


CSP = (f"default-src 'none'; script-src {_sha256(_SCRIPT)}; style-src {_sha256(_STYLE)}; "
       "require-trusted-types-for 'script'; trusted-types 'none'; base-uri 'none'; form-action 'none'")


def _text(s) -> str:
    """A string safe to encode as UTF-8: lone surrogates become U+FFFD."""
    s = str(s)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def esc(s) -> str:
    return html.escape(_text(s), quote=True)


def json_block(data) -> str:
    """JSON for a ``<script type="application/json">`` block: nothing in it can end the element, open a
    comment or break a line for a JavaScript parser."""
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _r3(v):
    """What the page shows: 3 decimals (the script prints these with toFixed(3), so no double rounding);
    None for a missing or non-finite value."""
    return round(float(v), 3) + 0.0 if _finite(v) else None


def pir_colour(v: float, scale: float) -> str | None:
    """The background of a token with this PIR (None: near 0, uncoloured); the terminal view uses it too."""
    if not _finite(v):
        return "#bbbbbb"
    level = sum(abs(v) >= e * scale for e in EDGES)
    return (ORANGE if v > 0 else BLUE)[level - 1] if level else None


def level_class(v: float, scale: float, clip_min: float) -> str:
    """A token's one CSS class: colour level (``o1``..``o5`` orange, ``b1``..``b5`` blue, none near 0,
    ``n`` for a non-finite PIR), with ``h`` appended when PIR > m (``o4h``; just ``h`` if uncoloured)."""
    if not _finite(v):
        return "n"
    level = sum(abs(v) >= e * scale for e in EDGES)
    return (("o" if v > 0 else "b") + str(level) if level else "") + ("h" if v > clip_min else "")


def _shown(token: str, inline: bool = False) -> str:
    """A token as the page shows it: a line break as a visible arrow (followed by the break itself in the
    response, not in the one-line boxes of the tables and the tooltip); an empty token as an empty-set sign."""
    t = _text(token)
    return t.replace("\n", "\u21b5" if inline else "\u21b5\n") if t else "\u2205"


def _legend(scale: float, clip_min: float, clip_max: float, without: str = "input",
            contrast: dict | None = None) -> str:
    edges = [e * scale for e in EDGES]
    sw = [f"<span class='sw b5'>&le; &minus;{edges[-1]:g}</span>"]
    sw += [f"<span class='sw b{k}'>&minus;{edges[k]:g} &hellip; &minus;{edges[k - 1]:g}</span>"
           for k in range(4, 0, -1)]
    sw += [f"<span class='sw'>|PIR| &lt; {edges[0]:g}</span>"]
    sw += [f"<span class='sw o{k}'>{edges[k - 1]:g} &hellip; {edges[k]:g}</span>" for k in range(1, 5)]
    sw += [f"<span class='sw o5'>&ge; {edges[-1]:g}</span>"]
    return (
        "<div class='legend' id='legend'><p>Each response token is coloured by "
        f"<b>PIR</b> = log p(token | profile, input) &minus; log p(token | {esc(without)}), in nats. "
        "<b>Colour scale: blue&ndash;orange diverging</b> (chosen to stay readable with red&ndash;green colour "
        "blindness): <b>orange</b> = the profile made the token more likely, <b>blue</b> = less likely, darker = "
        "larger |PIR|.</p><p>" + "".join(sw) + "</p>"
        f"<p><span class='sw o3h'>bar below</span> PIR &gt; m = {clip_min:g}: PerCE gives the token more than the "
        f"floor weight. <b>Clip [m, M] = [{clip_min:g}, {clip_max:g}]</b>: PerCE weight = clip(PIR, {clip_min:g}, "
        f"{clip_max:g}). <span class='sw n'>dashed</span> PIR not finite.</p><p>Hover a token for its numbers; "
        "click it to keep them. Keyboard: Tab reaches each response, &larr; &rarr; Home End move between its "
        "tokens, Esc hides the numbers.</p>" + (_contrast_legend(contrast, without) if contrast else "") + "</div>")


def _contrast_legend(contrast: dict, without: str) -> str:
    def num(key):
        v = contrast.get(key)
        return esc(format(v, "g") if isinstance(v, (int, float)) else v)
    a = num("alpha")
    return (
        f"<p id='contrast'><b>Generated by profile-contrastive decoding</b>: each token maximized log p(v | profile, "
        f"input, prefix) + {a} &times; [log p(v | profile, input, prefix) &minus; log p(v | {esc(without)}, prefix)] "
        f"(alpha = {a}) among the tokens whose with-profile probability is at least {num('plausibility')} "
        "times the top token's. The colour is the PIR of the generated token at that step (same prefix). "
        "<span class='sw c'>overline</span> the contrast changed this token: plain greedy decoding "
        "(alpha 0) would have picked another token after the same prefix; hover shows which.</p>")


def render(examples: list[dict], title: str = "PerContrast token scores", scale: float = 3.0, *,
           clip_min: float = 0.8, clip_max: float = 5.0, top_tokens: int = 20,
           top_candidates: int = TOP_CANDIDATES, counterfactual: str = "remove",
           contrast: dict | None = None) -> str:
    """The token explorer page for ``examples`` (``percontrast score`` results).

    Each example: ``id``, ``input``, ``tokens`` (strings) and ``pir``; optional ``logp_with``,
    ``logp_without``, ``weights``, ``entropy`` (lists of floats, one per token), ``profile`` (the
    profile items as they stood in the prompt), ``profile_removed``, and ``top_with`` /
    ``top_without`` (per token a list of ``[token string, probability]``, highest first). What is
    missing is left out. ``scale``: |PIR| in nats at full colour; ``clip_min``/``clip_max``: the
    PerCE clip [m, M] the legend and the summary use. ``counterfactual="swap"``: log p_without was
    computed with another user's profile (labels say so). ``contrast`` (``alpha``, ``plausibility``):
    the examples are generated outputs of profile-contrastive decoding; each may carry ``changed``
    (per token: the contrast changed it) and ``plain_tokens`` (per token: plain greedy decoding's
    pick), shown as an overline and on hover. Returns one HTML page."""
    vocab: dict[str, int] = {}

    def cands(lists, n):
        if not lists:
            return None
        out, isfinite = [], math.isfinite
        for pairs in lists[:n]:
            flat = []
            for tok, p in (pairs or [])[:top_candidates]:
                idx = vocab.get(tok)
                if idx is None:
                    idx = vocab.setdefault(_text(tok), len(vocab))
                flat.append(idx)
                # a percentage to 3 significant digits; the script shows it with toPrecision(3)
                flat.append(float(f"{p * 100:.3g}") if isfinite(p) else 0.0)
            out.append(flat)
        return out

    data_x, stats, sections, hot = [], [], [], []
    total = above = n_changed = 0
    without = "another user's profile, input" if counterfactual == "swap" else "input"
    for i, ex in enumerate(examples):
        tokens, pir = list(ex["tokens"]), list(ex["pir"])
        n = len(tokens)
        rec = {"id": _text(ex["id"]), "p": [_r3(v) for v in pir]}
        for key, short in (("logp_with", "a"), ("logp_without", "b"), ("weights", "w"), ("entropy", "e")):
            if ex.get(key) is not None:
                rec[short] = [_r3(v) for v in ex[key][:n]]
        for key, short in (("top_with", "tw"), ("top_without", "to")):
            c = cands(ex.get(key), n)
            if c is not None:
                rec[short] = c
        if ex.get("changed") is not None:   # the plain pick's vocabulary index where the contrast changed it
            rec["q"] = [vocab.setdefault(_text(ex["plain_tokens"][j]), len(vocab)) if ch else None
                        for j, ch in enumerate(ex["changed"][:n])]
            n_changed += sum(1 for c in ex["changed"][:n] if c)
        data_x.append(rec)
        finite = [v for v in pir if _finite(v)]
        up = sum(v > clip_min for v in finite)
        total += n
        above += up
        mean = sum(finite) / len(finite) if finite else None
        stats.append([n, _r3(mean), round(up / n, 4) if n else None, _r3(max(finite)) if finite else None])
        hot += [(v, i, j) for j, v in enumerate(pir) if _finite(v)]
    hot = sorted(hot, key=lambda h: (-h[0], h[1], h[2]))[:top_tokens]
    anchors = {(i, j) for _, i, j in hot}

    for i, ex in enumerate(examples):
        spans = []
        weights = ex.get("weights")
        changed = ex.get("changed") or []
        for j, (t, v) in enumerate(zip(ex["tokens"], ex["pir"])):
            cls = level_class(v, scale, clip_min)       # [a-z0-9]+: needs no quotes
            if j < len(changed) and changed[j]:          # "c " first: [class$=h] still sees the bar suffix
                cls = f"'c {cls}'" if cls else "c"
            attrs = (f" class={cls}" if cls else "") + (f" id=t{i}-{j}" if (i, j) in anchors else "")
            # roving tabindex: Tab reaches each response once, the arrow keys move between its tokens
            spans.append(f"<span{attrs}{' tabindex=0' if j == 0 else ''}>{esc(_shown(t))}</span>")
        prof = ""
        if "profile" in ex and ex["profile"] is not None:
            items = [str(p) for p in ex["profile"]]
            if items:
                prof = (f"<div class='prof'><h3>Profile: {len(items)} item{'s' if len(items) != 1 else ''} in the "
                        "prompt</h3><ol>" + "".join(f"<li>{esc(p)}</li>" for p in items) + "</ol></div>")
            else:
                cut = " (the length limit cut the whole profile)" if ex.get("profile_removed") else ""
                prof = (f"<div class='prof'><h3>Profile</h3><p class='meta'>No profile items in the prompt{cut}."
                        "</p></div>")
        s = stats[i]
        mean = "n/a" if s[1] is None else f"{s[1]:+.3f}"
        sections.append(
            f"<section class='ex' id='ex-{i}'><h2>Example {i + 1}: {esc(ex['id'])}</h2>"
            f"<p class='meta'>{s[0]} tokens &middot; mean PIR {mean}"
            + (f" &middot; {sum(1 for c in changed if c)} changed by the contrast" if contrast
               else "" if weights is not None else " &middot; no PerCE weights in this file") + "</p>"
            + prof + f"<h3>Input</h3><div class='inp'>{esc(ex.get('input', ''))}</div>"
            f"<h3>Response</h3><div class='r' data-x='{i}' role='group' aria-label='response tokens: arrow keys move, "
            f"Esc hides the numbers'>{''.join(spans)}</div></section>")

    share = above / total if total else 0.0
    top_rows = "".join(
        f"<tr><td class='num'>{r + 1}</td>"
        f"<td><span class='tk'>{esc(_shown(examples[i]['tokens'][j], inline=True))}</span></td>"
        f"<td class='num'>{_r3(v):+.3f}</td><td><a href='#t{i}-{j}'>{esc(examples[i]['id'])}</a></td></tr>"
        for r, (v, i, j) in enumerate(hot))
    heads = ["#", "example id", "tokens", "mean PIR", f"share PIR &gt; {clip_min:g}", "max PIR"]
    means_head = "".join(f"<th aria-sort='none'><button type='button' data-k='{k}'>{h}</button></th>"
                         for k, h in enumerate(heads))

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    means_rows = "".join(
        f"<tr><td class='num'>{i + 1}</td><td><a href='#ex-{i}'>{esc(ex['id'])}</a></td><td class='num'>{s[0]}</td>"
        f"<td class='num'>{f(s[1], '+.3f')}</td><td class='num'>{f(s[2], '.1%')}</td>"
        f"<td class='num'>{f(s[3], '+.3f')}</td></tr>"
        for i, (ex, s) in enumerate(zip(examples, stats)))
    data = {"m": clip_min, "M": clip_max, "v": list(vocab), "x": data_x, "s": stats}
    if counterfactual == "swap":
        data["cf"] = 1
    if contrast:
        data["g"] = 1
    changed_share = n_changed / total if total else 0.0
    changed_p = (f"<p id='changed'><b>{n_changed} of {total} generated tokens ({changed_share:.1%}) were changed "
                 "by the contrast</b> (plain greedy decoding would have picked another token after the same "
                 "prefix).</p>") if contrast else ""

    return "".join([
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>", _legend(scale, clip_min, clip_max, without, contrast),
        "<section id='summary'><h2>Summary</h2>",
        f"<p id='share'>{len(examples)} examples, {total} response tokens. <b>{above} of {total} tokens "
        f"({share:.1%}) have PIR &gt; m = {clip_min:g}</b>, i.e. PerCE weights them above the floor.</p>",
        changed_p,
        f"<div class='cols'><div><h3>The {len(hot)} most personal tokens (highest PIR)</h3>",
        "<div class='scroll'><table id='pc-top'><thead><tr><th>#</th><th>token</th><th>PIR</th><th>example</th></tr>"
        f"</thead><tbody>{top_rows}</tbody></table></div></div>",
        "<div><h3>Mean PIR per example (click a header to sort)</h3>",
        f"<div class='scroll'><table id='pc-means'><thead><tr>{means_head}</tr></thead><tbody>{means_rows}</tbody>"
        "</table></div></div></div></section>",
        *sections,
        "<div id='pc-tip' role='tooltip' hidden></div>",
        f"<script type='application/json' id='pc-data'>{json_block(data)}</script>",
        f"<script>{_SCRIPT}</script></body></html>",
    ])
