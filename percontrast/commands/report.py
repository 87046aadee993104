"""``percontrast report``: one HTML page with plots of a ``train`` or ``compare`` output folder.

    percontrast report runs/perce                     # a train folder (train_results.json)
    percontrast report runs/perce --eval out/eval     # ... with an eval folder's summary.json
    percontrast report out/compare                    # a compare folder (results.json)

Writes ``RUN_DIR/report.html`` and its plots as ``RUN_DIR/report_*.png`` (each written
atomically; the page last). The page is self-contained: the plots are embedded as data URIs
(the PNG files beside it are the same images), no script, no network, every text value
escaped, and a Content-Security-Policy that allows only those images and its own style.

A train folder gives: the run's numbers (method, steps, wall time, prompt-length counts),
one plot per logged series (loss, learning rate, mean PIR, mean weight, share of tokens with
PIR above the clip minimum m, gradient norm; a series the run did not log, e.g. mean PIR for
``ce``, is named as skipped), the evaluation numbers of every ``summary.json`` found in the
folder, in its direct subfolders or in a ``--eval`` folder, the step log, the config and the
run info. A compare folder gives the results table with intervals (from ``results.json``),
``results.png`` and the training curves of its cells (``cells/*.json``).

Also here: ``ProgressLineCallback``, the compact per-log-step progress line of ``train``
(``step 3/18  loss 4.2100  mean PIR 1.09  weight 1.12 ...`` on stderr).
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import field
from ..errors import UserError
from ..files import write_bytes_atomic, write_text_atomic


@dataclass
class ReportConfig:
    run_dir: str = field(help="A train output folder (train_results.json) or a compare output folder "
                         "(results.json); report.html and report_*.png are written into it.", positional=True)
    eval: list[str] = field(default_factory=list, help="Evaluation folders (percontrast eval --output-dir) "
                            "or their summary.json files to show with a train run; summary.json files in "
                            "RUN_DIR and its direct subfolders are found without it. Give RUN_DIR first.")


REPORT = "report.html"
PLOT_PREFIX = "report_"

# (log key, title, y label); in this order on the page
TRAIN_SERIES = (
    ("loss", "training loss", "loss per response token"),
    ("learning_rate", "learning rate", "learning rate"),
    ("mean_pir", "mean PIR", "mean PIR (nats)"),
    ("mean_weight", "mean token weight", "mean weight"),
    ("share_pir_above_min", "share of tokens with PIR above the clip minimum m", "share of tokens"),
    ("grad_norm", "gradient norm", "gradient norm (before clipping)"),
)
_PERCE_ONLY = {"mean_pir", "share_pir_above_min"}


# ---------------------------------------------------------------- reading

def _read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _read_mapping(path: Path, what: str) -> dict:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def series(log: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged key, skipping entries without a finite number."""
    xs, ys = [], []
    for i, entry in enumerate(log):
        if not isinstance(entry, dict):
            continue
        y = _number(entry.get(key))
        if y is None:
            continue
        x = _number(entry.get("step"))
        xs.append(x if x is not None else float(i + 1))
        ys.append(y)
    return xs, ys


# ---------------------------------------------------------------- plots

def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def line_plot(lines: dict[str, tuple[list[float], list[float]]], title: str, ylabel: str,
              hline: tuple[float, str] | None = None) -> bytes:
    """PNG bytes of one or more (steps, values) lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3, linewidth=1.4, label=label)
    if hline is not None:
        ax.axhline(hline[0], color="#888888", linestyle="--", linewidth=1, label=hline[1])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(lines) > 1 or hline is not None:
        ax.legend(fontsize=7)
    return _png(fig)


# ---------------------------------------------------------------- html pieces

def esc(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str, ensure_ascii=False)
    return str(v)


def _kv_table(pairs) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_fmt(v))}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    h = "".join(f"<th>{esc(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


def _figure(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
            f'<figcaption>{esc(caption)} (<a href="{esc(name)}">{esc(name)}</a>)</figcaption></figure>')


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1100px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
thead th{background:#f3f3f3}table.kv th{background:#f7f7f7;font-weight:600}
td{font-variant-numeric:tabular-nums;word-break:break-word}
figure{display:inline-block;margin:.5em 1em .5em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.note{color:#555;font-size:.9em}ul.skipped{color:#8a5a00}
details{margin:.6em 0}summary{cursor:pointer}
""".strip()


def page(title: str, body: str) -> str:
    """The whole document: no script, images only as data URIs, the style allowed by its hash."""
    style_hash = base64.b64encode(hashlib.sha256(_STYLE.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; img-src data:; style-src 'sha256-{style_hash}'; base-uri 'none'; "
           "form-action 'none'")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            '<meta name="referrer" content="no-referrer">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{_STYLE}</style></head>\n<body>\n{body}\n"
            f'<p class="note">Written by percontrast report, {esc(time.strftime("%Y-%m-%d %H:%M"))}.</p>\n'
            "</body></html>\n")


def _run_section(run) -> str:
    if not isinstance(run, dict):
        return ""
    parts = ["<h2>Run</h2>",
             _kv_table([(k, run.get(k)) for k in ("date", "machine", "git_commit") if k in run])]
    if isinstance(run.get("versions"), dict):
        parts.append("<details><summary>versions</summary>" + _kv_table(run["versions"].items()) + "</details>")
    if isinstance(run.get("config"), dict):
        parts.append("<details><summary>config</summary>" + _kv_table(run["config"].items()) + "</details>")
    return "\n".join(parts)


# ---------------------------------------------------------------- evaluation summaries

def _eval_paths(run_dir: Path, extra: list[str]) -> list[Path]:
    found = []
    for p in [run_dir / "summary.json", *sorted(run_dir.glob("*/summary.json"))]:
        if p.is_file():
            found.append(p)
    for e in extra:
        p = Path(e)
        if p.is_dir():
            p = p / "summary.json"
        if not p.is_file():
            raise UserError(f"--eval: {p}: not found (expected an eval output folder with summary.json)")
        found.append(p)
    out, seen = [], set()
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _eval_section(paths: list[Path], run_dir: Path) -> str:
    if not paths:
        return ('<h2>Evaluation</h2><p class="note">No evaluation: no summary.json in this folder or its '
                "subfolders, and no --eval folder given.</p>")
    summaries = []
    for p in paths:
        s = _read_mapping(p, "an eval summary")
        if not isinstance(s.get("metrics"), dict):
            raise UserError(f"{p}: no 'metrics' object; not a percontrast eval summary.json")
        summaries.append((p, s))
    metrics = list(dict.fromkeys(m for _, s in summaries for m in s["metrics"]))
    from .compare_report import _LABEL
    head = ["summary", "data", "examples", "model / predictions", "profile in prompt", "profile cut / removed"] + \
           [f"{_LABEL.get(m, m)} x100" for m in metrics]
    rows = []
    for p, s in summaries:
        try:
            name = str(p.relative_to(run_dir))
        except ValueError:
            name = str(p)
        cut = f"{_fmt(s.get('profile_cut'))} / {_fmt(s.get('profile_removed'))}" if "profile_cut" in s else "—"
        row = [name, _fmt(s.get("data")), _fmt(s.get("examples")), _fmt(s.get("model", s.get("predictions"))),
               _fmt(s.get("use_profile")), cut]
        for m in metrics:
            v = _number(s["metrics"].get(m))
            row.append("—" if v is None else f"{100 * v:.2f}")
        rows.append(row)
    return "<h2>Evaluation</h2>" + _table(head, rows) + \
        '<p class="note">Corpus means of the per-example scores, x100, as written by percontrast eval.</p>'


# ---------------------------------------------------------------- train folder

def _train_page(run_dir: Path, res: dict, cfg: ReportConfig, src: Path) -> tuple[str, list[str], list[str]]:
    log = res.get("log")
    if not isinstance(log, list):
        raise UserError(f"{src}: no 'log' list; not a percontrast train_results.json")
    method = res.get("method")
    run = res.get("run") if isinstance(res.get("run"), dict) else {}
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    clip_min = _number(config.get("clip_min"))
    plots, skipped, figures = [], [], []
    for key, title, ylabel in TRAIN_SERIES:
        name = f"{PLOT_PREFIX}{key}.png"
        xs, ys = series(log, key)
        if not ys:
            why = (f"method {method} logs no PIR" if key in _PERCE_ONLY and method != "perce"
                   else "not in this run's log")
            skipped.append(f"{title}: {why}")
            (run_dir / name).unlink(missing_ok=True)   # a stale plot of an earlier report would mislead
            continue
        if key == "share_pir_above_min" and clip_min is not None:
            title = f"share of tokens with PIR > m = {clip_min:g}"
        hline = (clip_min, f"clip minimum m = {clip_min:g}") if key == "mean_pir" and clip_min is not None else None
        png = line_plot({key: (xs, ys)}, title, ylabel, hline=hline)
        write_bytes_atomic(run_dir / name, png)
        plots.append(name)
        figures.append(_figure(name, png, f"{title} ({key}), {len(ys)} logged steps"))

    label = f"{run_dir.resolve().name} ({method})"
    numbers = [(k, v) for k, v in res.items() if k not in ("log", "run") and not isinstance(v, (dict, list))]
    parts = [f"<h1>Training run: {esc(label)}</h1>",
             f'<p class="note">Folder: {esc(run_dir)}. Source: {esc(src.name)}.</p>',
             "<h2>Summary</h2>", _kv_table(numbers)]
    if isinstance(config, dict) and config:
        keys = ("model", "data", "task", "method", "refresh", "clip_min", "clip_max", "normalize", "k",
                "learning_rate", "batch_size", "grad_accum", "max_steps", "epochs", "lora", "seed")
        parts.append(_kv_table([(k, config[k]) for k in keys if k in config]))
    parts.append("<h2>Per step</h2>")
    parts += figures or ['<p class="note">No series to plot: the log is empty.</p>']
    if skipped:
        parts.append('<p class="note">Not plotted:</p><ul class="skipped">' +
                     "".join(f"<li>{esc(s)}</li>" for s in skipped) + "</ul>")
    parts.append(_eval_section(_eval_paths(run_dir, cfg.eval), run_dir))
    keys = ["step", "epoch"] + [k for k, _, _ in TRAIN_SERIES] + ["pir_refreshed"]
    present = [k for k in keys if any(isinstance(e, dict) and k in e for e in log)]
    if present:
        rows = [[_fmt(e.get(k)) for k in present] for e in log if isinstance(e, dict)]
        parts.append(f"<details><summary>step log ({len(rows)} entries)</summary>{_table(present, rows)}</details>")
    parts.append(_run_section(run))
    return page(f"percontrast report: {label}", "\n".join(parts)), plots, skipped


# ---------------------------------------------------------------- compare folder

def _compare_tables(res: dict, g: dict) -> str:
    from .compare_report import REFERENCE, _LABEL, _fmt_delta, _fmt_iv, _prompt_note

    metrics = res["metrics"]
    label = [_LABEL.get(m, m) for m in metrics]
    head = ["method", "seeds"] + label + ["train+load s", "eval s", "peak MB"]
    rows = []
    for r in g["rows"]:
        row = [r["method"], str(len(r["seeds"]))] + [_fmt_iv(r["metrics"][m]) for m in metrics]
        mem = r.get("peak_mem_mb")
        row += [f"{r['train_s']:.0f}" if _number(r.get("train_s")) is not None else "—",
                f"{r['eval_s']:.0f}" if _number(r.get("eval_s")) is not None else "—",
                "—" if mem is None else f"{mem:.0f} ({r.get('mem_kind', '?')})"]
        rows.append(row)
    out = [_table(head, rows, "results")]
    head = ["method", "shared seeds with ce"] + \
           [f"Δ{x} vs ce [CI: examples] [CI: seeds, then examples]" for x in label] + [f"gain {x} %" for x in label]
    rows = []
    for r in g["rows"]:
        if r["method"] == REFERENCE:
            continue
        shared = r.get("shared_seeds")
        n_shared = "—" if shared is None else f"{len(shared)}{'*' if r.get('deterministic') and shared else ''}"
        gains = r.get("gain_pct") or {}
        row = [r["method"], n_shared] + [_fmt_delta((r.get("vs_ce") or {}).get(m), shared) for m in metrics]
        row += ["—" if gains.get(m) is None else f"{gains[m]:+.1f}" for m in metrics]
        rows.append(row)
    if rows:
        out.append(_table(head, rows, "results"))
    out.append(f'<p class="note">{esc(_prompt_note(g))}</p>')
    return "\n".join(out)


def _cell_curves(run_dir: Path) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{log key: {line label: (steps, values)}} of the trained cells (one line per trained model)."""
    curves: dict[str, dict] = {}
    for p in sorted((run_dir / "cells").glob("*.json")):
        cell = _read_mapping(p, "a compare cell")
        info = cell.get("train")
        if not cell.get("trained") or not isinstance(info, dict) or not isinstance(info.get("log"), list):
            continue
        label = f"{cell.get('method')} seed {cell.get('seed')}"
        if cell.get("lr") is not None:
            label += f" lr {cell['lr']:g}"
        if cell.get("clip_min") is not None:
            label += f" clip [{cell['clip_min']:g}, {cell.get('clip_max')}]"
        for key in ("loss", "mean_pir"):
            xs, ys = series(info["log"], key)
            if ys:
                curves.setdefault(key, {})[label] = (xs, ys)   # the same model for every eval set
    return curves


def _compare_page(run_dir: Path, res: dict, src: Path) -> tuple[str, list[str], list[str]]:
    from .compare_report import _NOTES, plot

    try:
        groups = res["groups"]
        title = f"compare: {res.get('model')} on {res.get('task')} ({res.get('train_data')})"
        parts = [f"<h1>{esc(title)}</h1>",
                 f'<p class="note">Folder: {esc(run_dir)}. Source: {esc(src.name)}.</p>',
                 _kv_table([(k, res.get(k)) for k in ("model", "task", "train_data", "methods", "seeds",
                                                      "metrics", "bootstrap_resamples")]),
                 f'<p class="note">{esc(_NOTES.format(resamples=res.get("bootstrap_resamples")).replace(chr(92), ""))}'
                 '</p>']
        for g in groups:
            parts.append(f"<h2>eval set {esc(g['eval_set'])} ({esc(g.get('task'))}, {esc(g.get('n_examples'))} "
                         f"examples), lr {esc(_fmt(g.get('lr')))}, clip [{esc(_fmt(g.get('clip_min')))}, "
                         f"{esc(_fmt(g.get('clip_max')))}]</h2>")
            parts.append(_compare_tables(res, g))
        if res.get("unhashed_cells"):
            parts.append(f'<p class="note">Cells without a settings hash, reused on the user\'s word: '
                         f'{esc(", ".join(map(str, res["unhashed_cells"])))}.</p>')
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError(f"{src}: not a percontrast compare results.json ({type(e).__name__}: {e})") from None

    plots, skipped = [], []
    parts.append("<h2>Plots</h2>")
    png_path = run_dir / "results.png"
    if png_path.is_file():
        parts.append(_figure("results.png", png_path.read_bytes(), "metrics per method, mean over seeds, "
                             "95% t-interval (compare's results.png)"))
    else:   # draw it here with compare's own plot, under the report's name
        name = f"{PLOT_PREFIX}results.png"
        try:
            plot(res, run_dir / name)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"{src}: cannot plot these results ({type(e).__name__}: {e})") from None
        plots.append(name)
        parts.append(_figure(name, (run_dir / name).read_bytes(), "metrics per method, mean over seeds, "
                             "95% t-interval"))
    curves = _cell_curves(run_dir)
    for key, title, ylabel in (("loss", "training loss of each trained model", "loss per response token"),
                               ("mean_pir", "mean PIR during training (perce)", "mean PIR (nats)")):
        name = f"{PLOT_PREFIX}train_{key}.png"
        if key not in curves:
            skipped.append(f"{title}: " + (f"no trained cell in cells/ logged {key}" if (run_dir / "cells").is_dir()
                                           else "no cells/ folder"))
            (run_dir / name).unlink(missing_ok=True)
            continue
        png = line_plot(curves[key], title, ylabel)
        write_bytes_atomic(run_dir / name, png)
        plots.append(name)
        parts.append(_figure(name, png, f"{title} (from cells/*.json; compare keeps each cell's last 50 log "
                             "entries)"))
    if skipped:
        parts.append('<p class="note">Not plotted:</p><ul class="skipped">' +
                     "".join(f"<li>{esc(s)}</li>" for s in skipped) + "</ul>")
    for k in ("train", "decoding", "prompt", "metric_versions"):
        if isinstance(res.get(k), dict):
            parts.append(f"<details><summary>{esc(k)}</summary>{_kv_table(res[k].items())}</details>")
    parts.append(_run_section(res.get("run")))
    return page(f"percontrast report: {title}", "\n".join(parts)), plots, skipped


# ---------------------------------------------------------------- the command

def run(cfg: ReportConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    if not run_dir.exists():
        raise UserError(f"{run_dir}: folder not found")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder")
    train_json, compare_json = run_dir / "train_results.json", run_dir / "results.json"
    if train_json.is_file():
        kind, src = "train", train_json
        text, plots, skipped = _train_page(run_dir, _read_mapping(train_json, "train results"), cfg, train_json)
    elif compare_json.is_file():
        if cfg.eval:
            raise UserError("--eval: only a train folder takes eval summaries; a compare folder has its own")
        kind, src = "compare", compare_json
        text, plots, skipped = _compare_page(run_dir, _read_mapping(compare_json, "compare results"), compare_json)
    else:
        raise UserError(f"{run_dir}: neither a train folder (train_results.json) nor a compare folder "
                        "(results.json)")
    write_text_atomic(run_dir / REPORT, text)   # last: the page names the plots written before it
    return {"kind": kind, "source": str(src), "report": str(run_dir / REPORT), "plots": plots,
            "not_plotted": skipped}


# ---------------------------------------------------------------- live progress

def format_log_line(logs: dict, step: int, max_steps: int | None = None, elapsed: float | None = None) -> str:
    """``step 3/18  loss 4.2100  mean PIR 1.090  weight 1.120  lr 2.0e-05  0:12`` from one Trainer log."""
    parts = [f"step {step}/{max_steps}" if max_steps and max_steps > 0 else f"step {step}"]
    for key, label, fmt in (("loss", "loss", ".4f"), ("mean_pir", "mean PIR", ".3f"),
                            ("mean_weight", "weight", ".3f"), ("learning_rate", "lr", ".1e")):
        v = logs.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{label} {v:{fmt}}")
    if elapsed is not None:
        m, s = divmod(int(elapsed), 60)
        parts.append(f"{m}:{s:02d}")
    return "  ".join(parts)


def _make_progress_callback():
    from transformers import TrainerCallback

    class ProgressLineCallback(TrainerCallback):
        """A ``transformers.TrainerCallback``: at each training log (every ``logging_steps``),
        one line ``step 3/18  loss 4.2100  mean PIR 1.090  weight 1.120  lr 2.0e-05  0:12`` on
        stderr, from the main process only. ``bar=True`` also draws a tqdm bar of the steps with
        the last loss and mean PIR, and writes the lines above it (``train`` uses it in place of
        the Trainer's bar, which prints raw log dicts).

            trainer = build_trainer(cfg, model, tok, records, callbacks=[ProgressLineCallback()])
            # or: trainer.add_callback(ProgressLineCallback())
        """

        def __init__(self, bar: bool = False, stream=None):
            self.bar = bar
            self.stream = stream   # None: sys.stderr at the time of writing
            self._tqdm = None
            self._t0 = None
            self._done = 0

        def _out(self):
            return self.stream if self.stream is not None else sys.stderr

        def on_train_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()
            self._done = state.global_step
            if self.bar and state.is_world_process_zero:
                from tqdm.auto import tqdm
                self._tqdm = tqdm(total=state.max_steps, initial=state.global_step, file=self._out(),
                                  dynamic_ncols=True, desc="train", unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            if self._tqdm is not None:
                self._tqdm.update(state.global_step - self._done)
            self._done = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self._t0 if self._t0 is not None else None
            line = format_log_line(logs, state.global_step, state.max_steps, elapsed)
            if self._tqdm is not None:
                post = {"loss": f"{logs['loss']:.4f}"}
                if isinstance(logs.get("mean_pir"), (int, float)):
                    post["PIR"] = f"{logs['mean_pir']:.3f}"
                self._tqdm.set_postfix(post, refresh=False)
                self._tqdm.write(line, file=self._out())
            else:
                print(line, file=self._out(), flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self._tqdm is not None:
                self._tqdm.close()
                self._tqdm = None

    ProgressLineCallback.__module__ = __name__
    ProgressLineCallback.__qualname__ = "ProgressLineCallback"
    return ProgressLineCallback


def __getattr__(name: str):
    # ProgressLineCallback subclasses transformers.TrainerCallback; importing transformers takes
    # seconds, so the class is built on first use, not when the CLI imports this module.
    if name == "ProgressLineCallback":
        cls = _make_progress_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
