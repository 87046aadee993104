"""PerCETrainer: equal to the stock Trainer for ce, accumulation-invariant, and every method learns."""
import pytest
import torch
from transformers import Trainer, TrainingArguments

from percontrast.encoding import PairedCollator, PromptBuilder
from percontrast.models import load_model
from percontrast.commands.train import ListDataset, TrainConfig, build_trainer


def _cfg(tmp_path, **kw):
    base = dict(model="tiny-random", data="builtin:sample-train", task="email", k=2, learning_rate=1e-3,
                max_steps=3, batch_size=4, output_dir=str(tmp_path / "run"), progress=False, save_steps=0,
                save_total_limit=None, logging_steps=1)
    base.update(kw)
    return TrainConfig(**base)


# Float64 runs and derived bounds. Two layouts of the same batch (aligned vs right-padded) or two
# accumulation shapes differ only in float64 summation order: a gradient entry moves by ~u * sum|terms|
# < 1e-14. AdamW's first steps divide a gradient by its own root second moment plus eps = 1e-8,
# which magnifies a difference d in a near-zero gradient to at most lr * d / eps = 1e-3 * 1e-14 / 1e-8
# = 1e-9 per step in the worst case; PARAM_TOL = 1e-8 covers 3 steps with margin (in float32 the
# same worst case is ~1e-2, which is why these tests are not run in float32). Logged losses go through
# the Trainer's float32 accumulator: both runs round nearly the same float64 loss, < 3 roundings of
# 6e-8 relative each.
PARAM_TOL = 1e-8
LOSS_RTOL = 1e-6
# The stock Trainer's causal-LM loss upcasts logits with .float(), i.e. computes the loss in float32
# even for a float64 model, so against it the gradients agree only to float32 precision: a few
# roundings of u32 = 6e-8 relative, i.e. < 3e-7 of an entry, and every entry is <= 1 after gradient
# clipping at norm 1. Plain SGD (no Adam magnification): 3 steps at lr 1e-3 move a parameter
# differently by < 3 * 1e-3 * 3e-7 = 1e-9; STOCK_PARAM_TOL = 1e-8.
STOCK_PARAM_TOL = 1e-8


def _tiny64():
    return load_model("tiny-random", dtype="float64")


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
    cfg = _cfg(tmp_path, method="ce", grad_accum=2, batch_size=2, optim="sgd")
    model_a, tok = _tiny64()
    ours, builder = build_trainer(cfg, model_a, tok, sample_train)
    ours.train()

    model_b, _ = _tiny64()
    rows = [dict(builder.encode(r), idx=i) for i, r in enumerate(sample_train)]
    args = TrainingArguments(output_dir=str(tmp_path / "stock"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3, max_steps=3, logging_steps=1,
                             seed=cfg.seed, data_seed=cfg.seed, use_cpu=True, report_to="none",
                             remove_unused_columns=False, optim="sgd", save_strategy="no",
                             disable_tqdm=True, logging_first_step=True)
    stock = Trainer(model=model_b, args=args, train_dataset=ListDataset(rows),
                    data_collator=_RightPadCollator(tok.pad_token_id))
    stock.train()
    init = _tiny64()[0]
    a, b = _losses(ours), _losses(stock)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= LOSS_RTOL * abs(y), (a, b)
    moved = 0.0
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=STOCK_PARAM_TOL, msg=n)
        moved = max(moved, (p - init.get_parameter(n)).abs().max().item())
    assert moved > 1e3 * STOCK_PARAM_TOL   # the steps moved the weights far more than the bound


@pytest.mark.parametrize("method", ["perce", "ce"])
def test_grad_accumulation_1x8_equals_8x1(tmp_path, sample_train, method):
    params = []
    for bs, ga in ((8, 1), (1, 8)):
        model, tok = _tiny64()
        cfg = _cfg(tmp_path / f"{bs}x{ga}", method=method, batch_size=bs, grad_accum=ga, max_steps=2)
        tr, _ = build_trainer(cfg, model, tok, sample_train)
        tr.train()
        params.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*params):
        torch.testing.assert_close(p, q, rtol=0, atol=PARAM_TOL)


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
                                         ("jsd", False), ("threshold", False), ("perce", True)])
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


# -- weights without dropout (review defect: PIR was a difference of two dropout masks) -----------
@pytest.mark.parametrize("method,signal", [("perce", "pir"), ("lossce", "token_loss"), ("entce", "entropy"),
                                           ("threshold", "pir"), ("jsd", "jsd")])
def test_weights_see_no_dropout(tmp_path, sample_train, monkeypatch, method, signal):
    """With lora_dropout 0.5 the signal behind the training weights equals what eval mode (what
    `percontrast score` uses) gives on the same batch: the same kernels on the same inputs, so equal."""
    import percontrast.trainer as trainer_mod
    from percontrast.scoring import score_batch

    model, tok = load_model("tiny-random")
    cfg = _cfg(tmp_path, method=method, lora=True, lora_dropout=0.5, limit=4, clip_min=-50.0, clip_max=50.0,
               allow_negative_clip=True)
    tr, _ = build_trainer(cfg, model, tok, sample_train[:4])
    assert tr.signal_needs_eval_pass
    torch.manual_seed(0)
    for n, p in tr.model.named_parameters():
        if "lora_B" in n:   # LoRA starts with B = 0, where dropout on its input changes nothing
            p.data.normal_(0, 0.5)
    batch = next(iter(tr.get_train_dataloader()))
    seen = {}
    real = trainer_mod.LOSSES[method]
    monkeypatch.setitem(trainer_mod.LOSSES, method, lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    tr.model.train()
    tr.compute_loss(tr.model, dict(batch), num_items_in_batch=int(batch["response_mask"].sum()))
    mask = batch["response_mask"].bool()
    # the training forward really is random, else this test could not fail
    from percontrast.scoring import with_profile_logits
    with torch.no_grad():
        a, b = with_profile_logits(tr.model, batch), with_profile_logits(tr.model, batch)
    assert not torch.equal(a, b)
    tr.model.eval()
    s = score_batch(tr.model, batch)
    if signal == "jsd":
        from percontrast.pir import js_divergence
        from percontrast.scoring import counterfactual_logits
        with torch.no_grad():
            want = {"jsd": js_divergence(with_profile_logits(tr.model, batch), counterfactual_logits(tr.model, batch))}
    else:
        want = {"pir": s.pir, "token_loss": -s.logp_with, "entropy": s.entropy}
    assert torch.equal(seen[signal][mask], want[signal][mask])


def test_no_dropout_means_no_extra_pass(tmp_path, sample_train):
    model, tok = load_model("tiny-random")
    tr, _ = build_trainer(_cfg(tmp_path, method="perce", limit=4), model, tok, sample_train[:4])
    assert not tr.signal_needs_eval_pass          # the tiny model has no dropout: reuse the training forward


# -- a skipped micro-batch ---------------------------------------------------------------------
def test_skipped_microbatch_update_is_the_kept_gradient_over_all_step_tokens(tmp_path, sample_train, monkeypatch):
    """--on-nonfinite skip, 2 micro-batches of 2: the step's update is -lr * grad(kept micro-batch loss
    divided by the token count of BOTH micro-batches), i.e. the skipped tokens count with weight 0.
    Float64 + plain SGD + no clipping: the same operations as the hand computation, so TOL = 1e-12."""
    import percontrast.trainer as trainer_mod

    batches, bad = [], 1
    real_cf = trainer_mod.counterfactual_logp

    def cf(model, batch):
        lp = real_cf(model, batch)
        return lp.clone().fill_(float("inf")) if bad in batch["idx"].tolist() else lp

    real_loss = trainer_mod.PerCETrainer.compute_loss

    def spy(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batches.append(({k: v.clone() for k, v in inputs.items()}, int(num_items_in_batch)))
        return real_loss(self, model, inputs, return_outputs, num_items_in_batch)

    monkeypatch.setattr(trainer_mod, "counterfactual_logp", cf)
    monkeypatch.setattr(trainer_mod.PerCETrainer, "compute_loss", spy)
    lr = 1e-2
    cfg = _cfg(tmp_path, method="perce", limit=4, batch_size=2, grad_accum=2, max_steps=1, optim="sgd",
               learning_rate=lr, lr_scheduler="constant", max_grad_norm=1e9, on_nonfinite="skip")
    model, tok = _tiny64()
    tr, _ = build_trainer(cfg, model, tok, sample_train[:4])
    tr.train()
    assert tr.skipped_nonfinite == 1 and len(batches) == 2
    (b0, n0), (b1, n1) = batches
    assert n0 == n1 == int(b0["response_mask"].sum() + b1["response_mask"].sum())   # both micro-batches
    kept = b0 if bad not in b0["idx"].tolist() else b1
    monkeypatch.setattr(trainer_mod.PerCETrainer, "compute_loss", real_loss)
    ref, _ = _tiny64()
    ref_tr, _ = build_trainer(_cfg(tmp_path / "ref", method="perce", limit=4), ref, tok, sample_train[:4])
    ref.train()
    ref_tr.compute_loss(ref, kept, num_items_in_batch=n0).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.detach(), (q - lr * q.grad).detach(), rtol=0, atol=1e-12, msg=n)
