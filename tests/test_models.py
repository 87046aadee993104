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
    torch.testing.assert_close(m(ids).logits, m2(ids).logits)
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


@pytest.mark.slow
def test_smollm2_profile_raises_likelihood_of_personal_sample():
    """With the real 135M model the user's profile makes their held-out messages more likely
    on average (mean PIR > 0): the signal PerCE builds on is there before any training."""
    from percontrast.data import load_records
    from percontrast.encoding import PromptBuilder
    from percontrast.prompts import get_task
    from percontrast.score import score_records

    model, tok = models.load_model("smollm2-135m")
    task = get_task("email")
    recs = load_records("builtin:sample-test", task)
    res = score_records(model, tok, recs, PromptBuilder(tok, task, k=3), progress=False)
    pir = [v for r in res for v in r["pir"]]
    assert all(map(lambda v: v == v, pir))  # finite, no NaN
    assert sum(pir) / len(pir) > 0.2
