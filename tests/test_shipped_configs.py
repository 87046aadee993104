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


V2 = [p for p in CONFIGS if p.parent.name == "study-v2"]


@pytest.mark.parametrize("path", V2, ids=lambda p: p.name)
def test_study_v2_configs_state_the_primary_contrast_and_keep_off_test(path):
    """Every study-v2 config carries the one pre-registered primary contrast in its header; a config whose
    header says it reads no test split evaluates on no eval set named test (or holding test data)."""
    head = " ".join(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#"))
    assert "Pre-registered primary contrast of study v2 (results/study-v2/README.md): perce - ce, ROUGE-L F1" in head
    cfg = build(CompareConfig, read_yaml(path), source=str(path))
    if "reads no test split" in head:
        sets = cfg.eval_sets_resolved()
        assert sets and all(s["name"] != "test" and "test" not in Path(s["data"]).name for s in sets)
