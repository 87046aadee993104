"""The training fast path: equal to the naive two-full-forwards implementation (PIR, loss,
gradients), only response positions through the LM head, a profile-free E-step at its own
length without autograd state or gradient checkpointing, and refresh caching that really
skips E-step passes."""
import logging

import pytest
import torch
from transformers import TrainingArguments
from transformers.modeling_layers import GradientCheckpointingLayer

from percontrast.encoding import PairedCollator
from percontrast.models import load_model
from percontrast.scoring import (counterfactual_logp, naive_counterfactual_logp, naive_with_profile_logp,
                                 with_profile_logits)
from percontrast.pir import token_logprobs
from percontrast.commands.train import TrainConfig, build_trainer
from percontrast.losses import METHODS
from percontrast.options import LossOptions
from percontrast.trainer import PerCETrainer

# Tolerance for fast == naive, derived: the runs are in float64 (u = 1.1e-16), where the two paths
# differ only in summation order (logsumexp vs a full log_softmax over V = 49,152 logits, an LM head
# on R positions vs on all L). A log-sum-exp over V terms formed in two orders differs by at most
# ~V u = 5e-12 in the log; gradients are sums of as many terms of size <= 1. TOL = 1e-9 leaves a
# margin of ~100, while the wrong answers the tests also check differ by > 1e-3.
TOL = 1e-9

# Uneven on purpose: prompts, profile-free prompts and responses all differ in length per row.
LENGTHS = [(9, 4, 5), (3, 2, 11), (14, 6, 1), (7, 7, 8)]   # (with-profile prompt, profile-free prompt, response)


def _batch(tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i, (pw, p0, r) in enumerate(LENGTHS):
        rnd = lambda n: torch.randint(10, 5000, (n,), generator=g).tolist()   # noqa: E731
        resp = rnd(r)
        feats.append({"prompt_with": rnd(pw), "prompt_without": rnd(p0), "response": resp, "idx": i})
    return PairedCollator(tok.pad_token_id)(feats)


def _trainer(model, tmp_path, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4)
    return PerCETrainer(model=model, args=args, perce_args=LossOptions(**kw))


def _loss_and_grads(trainer, model, batch):
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=int(batch["response_mask"].sum()))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("method", METHODS)   # nextquill: its with-grad profile-free pass too
def test_fast_equals_naive_loss_and_gradients(tmp_path, method):
    model, tok = load_model("tiny-random", dtype="float64")
    model.train()
    batch = _batch(tok)
    # Wide clip (m < 0) so the weights ARE the PIR values: a wrong PIR changes loss and gradients.
    kw = dict(method=method, clip_min=-50.0, clip_max=50.0, allow_negative_clip=True)
    loss_f, g_f = _loss_and_grads(_trainer(model, tmp_path / "f", fast=True, **kw), model, batch)
    loss_n, g_n = _loss_and_grads(_trainer(model, tmp_path / "n", fast=False, **kw), model, batch)
    torch.testing.assert_close(loss_f, loss_n, rtol=TOL, atol=TOL)
    assert g_f.keys() == g_n.keys() and len(g_f) == len(list(model.parameters()))
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_n[n], rtol=TOL, atol=TOL, msg=lambda m: f"{n}: {m}")
    assert any(g.abs().sum() > 0 for g in g_f.values())


def test_fast_equals_naive_pir_and_differs_from_a_wrong_pir():
    model, tok = load_model("tiny-random", dtype="float64")
    batch = _batch(tok)
    mask = batch["response_mask"].bool()
    with torch.no_grad():
        fast = token_logprobs(with_profile_logits(model, batch), batch["response_ids"]) - counterfactual_logp(model, batch)
        naive = naive_with_profile_logp(model, batch)[0] - naive_counterfactual_logp(model, batch)
    torch.testing.assert_close(fast[mask], naive[mask], rtol=TOL, atol=TOL)
    assert fast[mask].abs().max() > 1e-3          # a non-trivial PIR, so equality means something
    # The test can fail: shifting the response window by one column breaks it.
    shifted = dict(batch, cf_resp_start=batch["cf_resp_start"] + 1)
    with torch.no_grad():
        wrong = token_logprobs(with_profile_logits(model, batch), batch["response_ids"]) - \
            counterfactual_logp(model, shifted)
    assert (wrong[mask] - naive[mask]).abs().max() > 1e-3


def test_lm_head_sees_only_response_positions_and_estep_runs_at_its_own_length(tmp_path):
    model, tok = load_model("tiny-random")
    model.train()
    batch = _batch(tok)
    head_in, emb_in = [], []
    h1 = model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_in.append(tuple(i[0].shape)))
    h2 = model.get_input_embeddings().register_forward_hook(lambda m, i, o: emb_in.append(tuple(i[0].shape)))
    B, R = batch["response_ids"].shape
    Lc, L0 = batch["input_ids"].shape[1], batch["cf_input_ids"].shape[1]
    assert L0 < Lc
    try:
        _trainer(model, tmp_path / "f", fast=True).compute_loss(model, dict(batch))
        assert head_in == [(B, R, 64), (B, R, 64)]           # training forward, E-step: R positions each
        assert emb_in == [(B, Lc), (B, L0)]                  # E-step on the shorter profile-free sequence
        head_in.clear(), emb_in.clear()
        _trainer(model, tmp_path / "n", fast=False).compute_loss(model, dict(batch))
        assert head_in == [(B, Lc, 64), (B, L0, 64)]         # the naive path really is naive
    finally:
        h1.remove(), h2.remove()


def test_estep_keeps_no_autograd_state_and_skips_gradient_checkpointing():
    model, tok = load_model("tiny-random")
    batch = _batch(tok)
    with torch.no_grad():
        ref = counterfactual_logp(model, batch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    assert len(layers) == model.config.num_hidden_layers
    calls = []
    for layer in layers:
        real = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k)
    cf = counterfactual_logp(model, batch)
    assert not cf.requires_grad and cf.grad_fn is None
    assert calls == []                                       # no checkpoint wrapper in the E-step
    assert all(layer.gradient_checkpointing is True for layer in layers)   # switched back on afterwards
    assert torch.equal(cf, ref)   # same kernels on the same inputs: checkpointing is off in no-grad
    with_profile_logits(model, batch).sum().backward()       # the training forward does checkpoint
    assert len(calls) == len(layers)


def _train(tmp_path, sample_train, n, **kw):
    model, tok = load_model("tiny-random")
    base = dict(model="tiny-random", data="builtin:sample-train", task="email", k=2, learning_rate=1e-3,
                batch_size=4, output_dir=str(tmp_path), progress=False, save_steps=0,
                save_total_limit=None, logging_steps=1, limit=n)
    cfg = TrainConfig(**{**base, **kw})
    tr, _ = build_trainer(cfg, model, tok, sample_train[:n])
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    return tr, logs


def test_refresh_modes_count_estep_passes_and_label_logs(tmp_path, sample_train, caplog):
    caplog.set_level(logging.INFO, logger="percontrast.trainer")
    # 4 examples, batch 4: every step sees the same examples.
    tr, logs = _train(tmp_path / "s", sample_train, 4, method="perce", refresh="step", max_steps=5)
    assert tr.counterfactual_passes == 5 and [h["pir_refreshed"] for h in logs] == [1.0] * 5
    tr, logs = _train(tmp_path / "k", sample_train, 4, method="perce", refresh="every_k", refresh_every=2,
                      max_steps=5)
    assert tr.counterfactual_passes == 3                      # steps 0, 2, 4
    assert [h["pir_refreshed"] for h in logs] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert "refresh=every_k (k=2" in caplog.text and "not the paper's" in caplog.text
    tr, logs = _train(tmp_path / "o", sample_train, 4, method="perce", refresh="once", max_steps=4)
    assert tr.counterfactual_passes == 1
    tr, _ = _train(tmp_path / "c", sample_train, 4, method="ce", max_steps=2)
    assert tr.counterfactual_passes == 0


def test_every_k_reuses_exactly_the_cached_pir(tmp_path, sample_train):
    """On a cached step the loss uses the PIR stored when it was computed, not a fresh one."""
    import percontrast.trainer as trainer_mod
    used = []
    real = trainer_mod.PerCETrainer._pir

    def spy(self, model, inputs, logp_with):
        out = real(self, model, inputs, logp_with)
        used.append((self.state.global_step, out.detach().clone(), inputs["idx"].tolist()))
        return out

    trainer_mod.PerCETrainer._pir = spy
    try:
        tr, _ = _train(tmp_path, sample_train, 4, method="perce", refresh="every_k", refresh_every=3,
                       max_steps=3, learning_rate=5e-2)
    finally:
        trainer_mod.PerCETrainer._pir = real
    assert tr.counterfactual_passes == 1
    (s0, p0, i0), (s1, p1, i1), (s2, p2, i2) = used
    order = lambda p, idx: p[torch.tensor(idx).argsort()]   # noqa: E731  (batches may be shuffled)
    assert torch.equal(order(p0, i0), order(p1, i1)) and torch.equal(order(p0, i0), order(p2, i2))
