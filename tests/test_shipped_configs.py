"""Every shipped compare config parses into a CompareConfig (unknown keys, bad values and a bad train: block
are refused at build time) and names the command that runs it in its header, so a config that drifts from
the code fails here rather than at the start of a two-hour study."""
from pathlib import Path

import pytest

from percontrast.commands.compare import CompareConfig
from percontrast.config import build, read_yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs" / "compare").rglob("*.yaml"))


def test_there_are_compare_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_compare_config_parses_and_names_its_command(path):
    cfg = build(CompareConfig, read_yaml(path), source=str(path))
    assert cfg.methods and cfg.seeds
    rel = str(path.relative_to(ROOT))
    assert f"compare --config {rel}" in path.read_text(), f"{rel}: header lacks its command"
