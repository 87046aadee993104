"""A self-contained HTML heatmap of per-token PIR.

Every piece of text from data or tokenizers goes through ``html.escape`` (quotes
included), the page has no scripts and loads nothing from the network, and a strict
Content-Security-Policy forbids both, so a token like ``<script>`` or ``"onmouseover=``
is shown, never run.
"""
from __future__ import annotations

import html
import math

_CSP = "default-src 'none'; style-src 'unsafe-inline'"


def _color(v: float, scale: float) -> str:
    """Red for positive PIR (personal), blue for negative; alpha by magnitude."""
    if not math.isfinite(v):
        return "rgba(128,128,128,0.5)"
    a = min(abs(v) / scale, 1.0) * 0.85
    return f"rgba(220,40,40,{a:.3f})" if v > 0 else f"rgba(40,90,220,{a:.3f})"


def token_html(token: str, value: float, weight: float | None, scale: float) -> str:
    title = f"PIR {value:+.3f}" + (f", weight {weight:.2f}" if weight is not None else "")
    shown = token.replace("\n", "\u21b5\n")
    return (f'<span class="t" style="background:{_color(value, scale)}" title="{html.escape(title)}">'
            f"{html.escape(shown, quote=True)}</span>")


def render(examples: list[dict], title: str = "PerContrast token scores", scale: float = 3.0) -> str:
    """``examples``: dicts with ``id``, ``input``, ``output``, ``tokens`` (strings), ``pir`` and
    optional ``weights`` (lists of floats). Returns one HTML page."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'>"
             f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
             f"<title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.9}"
             ".t{white-space:pre-wrap;border-radius:3px;padding:1px 0}"
             ".ex{border-top:1px solid #ccc;padding:1em 0}.meta{color:#555;font-size:90%}"
             "</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<p class='meta'>Each response token is coloured by PIR = log p(token | profile, input) "
             "&minus; log p(token | input): <span style='background:rgba(220,40,40,.6)'>red</span> the profile "
             "made it more likely, <span style='background:rgba(40,90,220,.6)'>blue</span> less likely. "
             f"Full colour at |PIR| &ge; {scale:g} nats. Hover a token for its numbers.</p>"]
    for ex in examples:
        weights = ex.get("weights") or [None] * len(ex["tokens"])
        toks = "".join(token_html(t, v, w, scale) for t, v, w in zip(ex["tokens"], ex["pir"], weights))
        finite = [v for v in ex["pir"] if math.isfinite(v)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        parts.append(f"<div class='ex'><div class='meta'><b>{html.escape(str(ex['id']))}</b> &middot; "
                     f"mean PIR {mean:+.3f} &middot; input: {html.escape(ex['input'])}</div>"
                     f"<div>{toks}</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
