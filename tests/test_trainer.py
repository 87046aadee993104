"""PerCETrainer: equal to the stock Trainer for ce, accumulation-invariant, and every method learns."""
import pytest
import torch
from transformers import Trainer, TrainingArguments

from percontrast.encoding import PairedCollator, PromptBuilder
from percontrast.models import load_model
from percontrast.train import ListDataset, TrainConfig, build_trainer


def _cfg(tmp_path, **kw):
    base = dict(model="tiny-random", data="builtin:sample-train", task="email", k=2, learning_rate=1e-3,
                max_steps=3, batch_size=4, output_dir=str(tmp_path / "run"), progress=False, save_steps=0,
                save_total_limit=None, logging_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


class _RightPadCollator:
    """The ordinary layout: prompt+response right-padded, labels -100 on prompt and padding."""

    def __init__(self, pad):
        self.pad = pad

    def __call__(self, feats):
        seqs = [f["prompt_with"] + f["response"] for f in feats]
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), self.pad)
        att = torch.zeros((len(seqs), L), dtype=torch.long)
        lab = torch.full((len(seqs), L), -100)
        for b, (f, s) in enumerate(zip(feats, seqs)):
            ids[b, :len(s)] = torch.tensor(s)
            att[b, :len(s)] = 1
            lab[b, len(f["prompt_with"]):len(s)] = torch.tensor(f["response"])
        return {"input_ids": ids, "attention_mask": att, "labels": lab}


def test_ce_equals_stock_trainer(tmp_path, sample_train):
    cfg = _cfg(tmp_path, method="ce", grad_accum=2, batch_size=2)
    model_a, tok = load_model("tiny-random")
    ours, builder = build_trainer(cfg, model_a, tok, sample_train)
    ours.train()

    model_b, _ = load_model("tiny-random")
    rows = [dict(builder.encode(r), idx=i) for i, r in enumerate(sample_train)]
    args = TrainingArguments(output_dir=str(tmp_path / "stock"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3, max_steps=3, logging_steps=1,
                             seed=cfg.seed, data_seed=cfg.seed, use_cpu=True, report_to="none",
                             remove_unused_columns=False, optim="adamw_torch", save_strategy="no",
                             disable_tqdm=True, logging_first_step=True)
    stock = Trainer(model=model_b, args=args, train_dataset=ListDataset(rows),
                    data_collator=_RightPadCollator(tok.pad_token_id))
    stock.train()
    a, b = _losses(ours), _losses(stock)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-6 * max(1.0, abs(y)), (a, b)
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("method", ["perce", "ce"])
def test_grad_accumulation_1x8_equals_8x1(tmp_path, sample_train, method):
    params = []
    for bs, ga in ((8, 1), (1, 8)):
        model, tok = load_model("tiny-random")
        cfg = _cfg(tmp_path / f"{bs}x{ga}", method=method, batch_size=bs, grad_accum=ga, max_steps=2)
        tr, _ = build_trainer(cfg, model, tok, sample_train)
        tr.train()
        params.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def _batch_loss(model, tok, records, task):
    builder = PromptBuilder(tok, task, k=2)
    batch = PairedCollator(tok.pad_token_id)([builder.encode(r) for r in records])
    from percontrast.losses import ce_loss
    from percontrast.pir import token_logprobs
    from percontrast.scoring import with_profile_logits
    with torch.no_grad():
        logp = token_logprobs(with_profile_logits(model, batch), batch["response_ids"])
    return ce_loss(logp, batch["response_mask"]).item()


@pytest.mark.parametrize("method,lora", [("ce", False), ("perce", False), ("lossce", False), ("entce", False),
                                         ("perce", True)])
def test_training_changes_params_and_lowers_loss(tmp_path, sample_train, email_task, method, lora):
    model, tok = load_model("tiny-random")
    batch = sample_train[:4]
    before = _batch_loss(model, tok, batch, email_task)
    cfg = _cfg(tmp_path, method=method, lora=lora, max_steps=6, learning_rate=1e-2 if lora else 3e-3,
               limit=4, lr_scheduler="constant")
    tr, _ = build_trainer(cfg, model, tok, batch)
    trainable = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable
    tr.train()
    after_params = dict(tr.model.named_parameters())
    unchanged = [n for n, p in trainable.items() if torch.equal(p, after_params[n].detach())]
    assert not unchanged, f"parameters that did not move: {unchanged[:5]}"
    assert _batch_loss(tr.model, tok, batch, email_task) < before
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert all("mean_weight" in h for h in logs)
    if method == "perce":
        assert all({"mean_pir", "share_pir_above_min"} <= set(h) for h in logs)


def test_refresh_every_k_reuses_cached_pir(tmp_path, sample_train, monkeypatch):
    import percontrast.trainer as trainer_mod
    calls = []
    real = trainer_mod.counterfactual_logp
    monkeypatch.setattr(trainer_mod, "counterfactual_logp", lambda m, b: calls.append(1) or real(m, b))
    model, tok = load_model("tiny-random")
    # 4 examples, batch 4: every step sees the same examples; refresh every 3 steps -> passes at 0, 3
    cfg = _cfg(tmp_path, method="perce", refresh="every_k", refresh_every=3, max_steps=6, limit=4)
    tr, _ = build_trainer(cfg, model, tok, sample_train[:4])
    tr.train()
    assert len(calls) == 2
    calls.clear()
    cfg = _cfg(tmp_path / "once", method="perce", refresh="once", max_steps=5, limit=4)
    tr, _ = build_trainer(cfg, load_model("tiny-random")[0], tok, sample_train[:4])
    tr.train()
    assert len(calls) == 1
