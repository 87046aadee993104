"""The ``percontrast`` command line: parse, call the library, print.

Each command is a (config dataclass, run function) pair living in its own module of
``percontrast/commands/``;
flags come from the dataclass fields, ``--config FILE.yaml`` fills the same fields.
A ``UserError`` becomes one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from . import config as cfgmod
from .errors import UserError

# command -> (module, config class, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "score": ("percontrast.commands.score", "ScoreConfig", "Per-token PIR of examples, to JSON and an HTML heatmap."),
    "train": ("percontrast.commands.train", "TrainConfig", "Fine-tune with ce / perce / lossce / entce (full or LoRA)."),
    "generate": ("percontrast.commands.generate", "GenerateConfig", "Personalized generation for a data file."),
    "eval": ("percontrast.commands.evaluate", "EvalConfig", "Generate for a data file and score it (ROUGE, METEOR)."),
    "compare": ("percontrast.commands.compare", "CompareConfig", "Train and evaluate every method x seed; table with CIs."),
    "identify": ("percontrast.commands.identify", "IdentifyConfig", "Personal-token identification benchmark."),
    "report": ("percontrast.commands.report", "ReportConfig", "report.html with plots of a train or compare output folder."),
    "demo": ("percontrast.commands.demo", "DemoConfig", "The Quick start demo: score, heatmap, short PerCE fine-tune."),
    "export-weights": ("percontrast.commands.export_weights", "ExportWeightsConfig",
                       "PerCE token weights computed once, for other trainers (refresh=once, not the paper's bootstrap)."),
}
# nested: percontrast data prepare ...
DATA_COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("percontrast.commands.prepare", "PrepareConfig", "Write a benchmark or corpus as train/val/test JSONL."),
}


def _load(table):
    """{command: (module, config class, help)}, importing each command's module."""
    out = {}
    for name, (mod, cls, help_) in table.items():
        module = importlib.import_module(mod)
        out[name] = (module, getattr(module, cls), help_)
    return out


def _add_command(sub, name, cls, help_, module):
    p = sub.add_parser(name, help=help_, description=(module.__doc__ or help_).strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    names = {f.name for f in __import__("dataclasses").fields(cls)}
    if "config" not in names:
        p.add_argument("--config", metavar="FILE.yaml",
                       help="Read these options from a YAML file (flags given here override it).")
    cfgmod.add_arguments(p, cls)
    p.set_defaults(_cls=cls, _run=module.run)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="percontrast", description="Token-level personalization of LLMs: PerContrast scores, PerCE training.")
    parser.add_argument("--verbose", action="store_true", help="More logging.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, cls, help_) in _load(COMMANDS).items():
        _add_command(sub, name, cls, help_, module)
    data = sub.add_parser("data", help="Prepare benchmarks and corpora.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    for name, (module, cls, help_) in _load(DATA_COMMANDS).items():
        _add_command(dsub, name, cls, help_, module)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_cls", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        cfg = cfgmod.from_args(args._cls, args)
        result = args._run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if k not in ("log", "run")}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
