"""Model resolution: built-ins, local directories, atomic GGUF conversion, clear errors."""
import pytest
import torch

from percontrast import models
from percontrast.errors import UserError


def test_conversion_is_atomic(tmp_path, monkeypatch):
    """An interruption after weights were written leaves no cache entry and no temp folder."""
    import transformers

    tiny, _ = models.tiny_random()          # stands in for the GGUF load (keeps the test fast)
    monkeypatch.setenv("PERCONTRAST_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_smollm2()
    assert list((tmp_path / "models").iterdir()) == []


def test_tiny_random_is_deterministic():
    a, _ = models.tiny_random()
    b, _ = models.tiny_random()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_local_dir_errors(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        models.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no weights"):
        models.load_model(str(tmp_path))


def test_saved_checkpoint_round_trip(tmp_path):
    m, tok = models.tiny_random()
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, tok2 = models.load_model(str(tmp_path))
    ids = torch.tensor([[1, 2, 3]])
    # safetensors stores the float32 weights bit for bit and the forward is the same: equal, not close
    assert torch.equal(m(ids).logits, m2(ids).logits)
    assert tok2.chat_template == tok.chat_template


def test_corrupt_weights_one_line(tmp_path):
    m, tok = models.tiny_random()
    m.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="could not load model"):
        models.load_model(str(tmp_path))


def test_unknown_name_offline_is_user_error():
    with pytest.raises(UserError, match="could not load model 'no-such-org/no-such-model'.*hub is unreachable"):
        models.load_model("no-such-org/no-such-model")


def _save_lora(folder, base: str = "tiny-random"):
    """A LoRA output folder (adapter only, no config.json) as `train --lora` writes it, on ``base``."""
    from peft import LoraConfig, get_peft_model

    m, tok = models.tiny_random()
    m.config._name_or_path = m.name_or_path = base
    get_peft_model(m, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("base", ["tiny-random", "local-dir"])
def test_lora_folder_loads_its_base_with_the_requested_dtype(tmp_path, monkeypatch, base):
    """--dtype reaches the base model of a LoRA folder (it was always float32), as does trust_remote_code."""
    if base == "local-dir":  # a base in a folder goes through from_pretrained(dtype=...)
        m, tok = models.tiny_random()
        m.save_pretrained(tmp_path / "base")
        tok.save_pretrained(tmp_path / "base")
        base = str(tmp_path / "base")
    folder = _save_lora(tmp_path / "lora", base)
    calls = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda name, **kw: calls.append((name, kw)) or real(name, **kw))
    model, _ = models.load_model(str(folder), dtype="bfloat16", trust_remote_code=True)
    assert calls[-1] == (base, {"dtype": "bfloat16", "trust_remote_code": True})  # the base model's load
    base_params = {n: p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert base_params and set(base_params.values()) == {torch.bfloat16}
    assert any("lora_" in n for n, _ in model.named_parameters())
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out.float()).all()
    model32, _ = real(str(folder))                     # the default stays float32
    assert {p.dtype for n, p in model32.named_parameters() if "lora_" not in n} == {torch.float32}


def test_damaged_lora_folder_is_one_line(tmp_path):
    folder = _save_lora(tmp_path / "lora")
    cfg = folder / "adapter_config.json"
    good = cfg.read_text()
    cfg.write_text(good[:40])
    with pytest.raises(UserError, match=r"adapter_config\.json: not valid JSON"):
        models.load_model(str(folder))
    cfg.write_text("[]")
    with pytest.raises(UserError, match="field 'base_model_name_or_path' is missing"):
        models.load_model(str(folder))
    cfg.write_text(good)
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="could not load the LoRA adapter"):
        models.load_model(str(folder))


def test_demo_loads_the_model_with_dtype_and_trust_remote_code(tmp_path, monkeypatch):
    """demo honours the shared model options (it used to ignore --dtype and --trust-remote-code)."""
    from helpers import model_load_args

    from percontrast.commands import demo
    calls = model_load_args(monkeypatch, demo, demo.DemoConfig, [
        "--model", "some/model", "--dtype", "float16", "--trust-remote-code", "--output-dir", str(tmp_path / "d")])
    assert calls == [("some/model", {"dtype": "float16", "trust_remote_code": True, "device": None})]


@pytest.mark.slow
def test_smollm2_profile_raises_likelihood_of_personal_sample():
    """With the real 135M model the user's profile makes their held-out messages more likely
    on average (mean PIR > 0): the signal PerCE builds on is there before any training."""
    from percontrast.datasets import load_records
    from percontrast.encoding import PromptBuilder
    from percontrast.prompts import get_task
    from percontrast.commands.score import score_records

    model, tok = models.load_model("smollm2-135m")
    task = get_task("email")
    recs = load_records("builtin:sample-test", task)
    res = score_records(model, tok, recs, PromptBuilder(tok, task, k=3), progress=False)
    pir = [v for r in res for v in r["pir"]]
    assert torch.isfinite(torch.tensor(pir)).all()  # no NaN and no +-inf
    assert sum(pir) / len(pir) > 0.2


@pytest.mark.slow
def test_a_lora_adapter_on_a_builtin_records_its_name(tmp_path):
    """An adapter trained on a built-in names it ("smollm2-135m"), not this machine's cache folder, so
    the adapter folder loads on another machine (load_model converts the built-in there)."""
    import json

    from peft import LoraConfig, get_peft_model

    base, _ = models.load_model("smollm2-135m")
    assert base.name_or_path == "smollm2-135m"
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    acfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == "smollm2-135m"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = lora(input_ids=ids).logits
        again, _ = models.load_model(str(tmp_path / "adapter"))
        assert torch.equal(again(input_ids=ids).logits, want)   # the same weights, the same ops
