"""The peer baselines ``nextquill`` (NextQuill's released code) and ``dft`` (TRL's DFT): hand-written sums,
stop-gradient, NextQuill's two-level weights around its margin, DFT against TRL 1.16 itself, and tiny
training runs in which every trainable parameter moves.

Float64 tolerances: a hand computation and ``losses.py`` add the same O(1) terms in other orders and
divide once; n <= 8 terms of size <= 10 give a difference below n * u * sum|terms| < 8 * 1.2e-16 * 80
< 1e-13, so TOL = 1e-13 (a wrong weight or normalization moves the loss by > 1e-2 on these tensors)."""
from __future__ import annotations

import math

import pytest
import torch

from percontrast.losses import (LOSSES, NEXTQUILL_ALPHA, NEXTQUILL_HIGH, NEXTQUILL_LOW, NEXTQUILL_MARGIN, dft_loss,
                                nextquill_loss, nextquill_weights, probability_gain)
from percontrast.pir import token_logprobs

TOL = 1e-13
U64 = torch.finfo(torch.float64).eps / 2   # unit roundoff of float64


def _data():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(2, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return logp, mask


# -- nextquill ---------------------------------------------------------------------------------
def test_their_constants():
    # train.py, CustomTrainer3: threshold = 0.05, high_weight, low_weight = 0.9, 0.1, alpha = 0.1
    assert (NEXTQUILL_MARGIN, NEXTQUILL_HIGH, NEXTQUILL_LOW, NEXTQUILL_ALPHA) == (0.05, 0.9, 0.1, 0.1)


def test_nextquill_weights_are_two_level_around_a_probability_margin():
    # p_with, p_without per token: gains 0.10 (above), 0.02 (below), -0.30 (below), and 0.0009 with a
    # log-ratio of ln 10 = 2.3 nats: PIR calls it personal (threshold's margin ln 2), NextQuill does not,
    # since its margin is on the probability difference.
    p_with = torch.tensor([[0.60, 0.52, 0.20, 0.001]], dtype=torch.float64)
    p_without = torch.tensor([[0.50, 0.50, 0.50, 0.0001]], dtype=torch.float64)
    gain = probability_gain(p_with.log(), p_without.log())
    # exp(log p) = p(1 + d) with |d| <= (|ln p| + 1) u (log and exp each round once, the log's error is
    # amplified by exp): for p in [1e-4, 0.6] each p's error is below p (|ln p| + 1) u <= 1.0 u, two of
    # them plus the subtraction's rounding of a result <= 0.6: < 2.6 u, under the 4 u bound on any IEEE machine.
    assert torch.allclose(gain, p_with - p_without, rtol=0, atol=4 * U64)
    assert nextquill_weights(gain).tolist() == [[0.9, 0.1, 0.1, 0.1]]
    assert (p_with.log() - p_without.log())[0, 3] > math.log(2)


def test_nextquill_margin_is_strict():
    # their `p1 - p2 > threshold`: exactly at the margin is low, the next float above is high
    at = torch.tensor([0.05, math.nextafter(0.05, 1.0), 0.049999], dtype=torch.float64)
    assert nextquill_weights(at).tolist() == [0.1, 0.9, 0.1]


def test_nextquill_loss_matches_hand_computation():
    logp, mask = _data()
    diff_logp = torch.tensor([[-2.0, -1.0, -0.5, -9.0], [-3.0, -0.25, -7.0, -7.0]], dtype=torch.float64)
    gain = torch.tensor([[0.3, 0.01, 0.06, 0.9], [-0.2, 0.051, 0.9, 0.9]], dtype=torch.float64)  # padding: anything
    w = [[0.9, 0.1, 0.9], [0.1, 0.9]]                             # real tokens only
    s = sum(map(sum, w))                                           # their weight.sum() = 2.9
    lp = logp.detach()
    main = sum(w[b][i] / s * -lp[b, i] for b in range(2) for i in range(len(w[b])))
    aux = (2.0 + 1.0 + 0.5 + 3.0 + 0.25) / 5                       # their CrossEntropyLoss(): mean over labels
    got = nextquill_loss(logp, mask, prob_gain=gain, diff_logp=diff_logp)
    assert abs(got.item() - (main + 0.1 * aux).item()) < TOL
    # the auxiliary coefficient is a real knob of the pure function (0: no auxiliary term)
    assert abs(nextquill_loss(logp, mask, prob_gain=gain, diff_logp=diff_logp, alpha=0.0).item() - main.item()) < TOL


def test_nextquill_loss_is_their_formula_on_logits():
    """From two logit tensors [B, R, V]: their code's steps written out (softmax, p1 - p2 > 0.05, 0.9/0.1,
    masked, divided by the sum, CE on the logits, plus 0.1 x mean CE of z_with - z_without) against
    the trainer's inputs built with token_logprobs. Same tolerance as above (V = 5 terms per softmax)."""
    g = torch.Generator().manual_seed(1)
    z_with = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    z_without = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    y = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # theirs, flattened as in train.py (labels -100 on the padded slot)
    labels = torch.where(mask.bool(), y, torch.full_like(y, -100)).view(-1)
    p1 = torch.softmax(z_with, -1).view(-1, 5)[torch.arange(6), y.view(-1)]
    p2 = torch.softmax(z_without, -1).view(-1, 5)[torch.arange(6), y.view(-1)]
    # Their `0.9 * torch.ones_like(bool)` is float32 (0.9f, 0.1f: ratio 9 to 4e-8 relative); the
    # constants are meant as 0.9 and 0.1, and float64 holds them so (float32 ones would miss TOL).
    w = torch.where(p1 - p2 > 0.05, torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64))
    w = torch.where(labels > -100, w, torch.zeros_like(w))
    w = w / w.sum()
    ce = torch.nn.functional.cross_entropy(z_with.view(-1, 5), labels, reduction="none", ignore_index=-100)
    aux = torch.nn.functional.cross_entropy((z_with - z_without).view(-1, 5), labels, ignore_index=-100)
    theirs = (w * ce).sum() + 0.1 * aux
    assert 0 < (p1 - p2 > 0.05).sum() < 6                         # both weight levels occur
    lw, lo = token_logprobs(z_with, y), token_logprobs(z_without, y)
    ours = nextquill_loss(lw, mask, prob_gain=probability_gain(lw, lo), diff_logp=token_logprobs(z_with - z_without, y))
    assert abs(ours.item() - theirs.item()) < TOL
    # The profile-free logits are trained only through the auxiliary term (the weights are constants):
    # CE(d) = lse(d) - d_y with d = z_with - z_without: d loss / d z_without = alpha / n * (onehot(y) - softmax(d)).
    ours.backward()
    onehot = torch.nn.functional.one_hot(y, 5).to(torch.float64)
    want = 0.1 / 5 * (onehot - torch.softmax((z_with - z_without).detach(), -1)) * mask[..., None]
    assert (z_without.grad - want).abs().max() < TOL


def test_nextquill_weights_are_constants():
    logp, mask = _data()
    gain_src = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    diff = (-torch.rand(2, 4, dtype=torch.float64) * 2).requires_grad_()
    loss = nextquill_loss(logp, mask, prob_gain=gain_src * 0.2, diff_logp=diff)
    loss.backward()
    assert gain_src.grad is None                                   # no gradient through the weights
    w = nextquill_weights(gain_src.detach() * 0.2) * mask
    # d loss / d logp_i = -w_i / sum(w); d loss / d diff_i = -alpha / n
    assert (logp.grad + w / w.sum()).abs().max() < TOL
    assert (diff.grad + 0.1 * mask.double() / 5).abs().max() < TOL


# -- dft ---------------------------------------------------------------------------------------
def test_dft_matches_hand_computation_and_detaches_p():
    logp, mask = _data()
    lp = logp.detach()
    want = sum(-lp[b, i].exp() * lp[b, i] for b, n in ((0, 3), (1, 2)) for i in range(n)) / 5
    loss = dft_loss(logp, mask)
    assert abs(loss.item() - want.item()) < TOL
    loss.backward()
    # p held constant: d/dlogp of -p * logp / n is -p / n; through p it would be -p (1 + logp) / n
    assert (logp.grad + lp.exp() * mask / 5).abs().max() < TOL
    assert abs(dft_loss(logp, mask, num_items=10).item() - want.item() * 5 / 10) < TOL   # the step's token count


def test_dft_equals_trls_dft(tmp_path):
    """TRL 1.16's SFTTrainer(loss_type="dft") on a tiny float64 model, against ours.

    (a) On TRL's own per-token log-probs (a second, identical forward of the fused head: same CPU
    kernels on the same inputs): TRL sums -lp * exp(lp).detach() over [B, L-1] and divides by the
    label count; ours sums exp(lp) * mask * lp over the same tensor, negates and divides by the same
    count. Negation and x * 1.0 are exact and products commute, so the summands and the sums are the
    same floats: loss and every gradient entry are equal exactly.
    (b) On the model's plain logits (lm_head, then token_logprobs): a derived bound, below."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from percontrast.models import load_model

    model, tok = load_model("tiny-random", dtype="float64")
    ds = Dataset.from_list([{"prompt": f"Write to {n}:\n", "completion": f"Dear {n}, see you at {t}."}
                            for n, t in (("Ann", "noon"), ("Bob", "six"), ("Cy", "ten o'clock"))])
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", loss_type="dft",
                     per_device_train_batch_size=3, max_length=None, save_strategy="no", disable_tqdm=True)
    trl = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trl.get_train_dataloader()))
    m = trl.model
    m.train()
    theirs = trl.compute_loss(m, dict(batch))
    theirs.backward()
    grads_theirs = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()

    # (a) TRL's log-probs, our loss
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    out = m(**inputs, use_cache=False, fused_lm_head=True)
    ours = dft_loss(out.log_probs, out.label_mask)
    assert ours.item() == theirs.item()
    ours.backward()
    assert grads_theirs and set(grads_theirs) == {n for n, p in m.named_parameters() if p.grad is not None}
    for n, p in m.named_parameters():
        if n in grads_theirs:
            assert torch.equal(p.grad, grads_theirs[n]), n
    m.zero_grad()

    # (b) our fast path's log-probs from the plain logits. Bound: a logit z_v = h . W_v (d terms) is
    # within gamma_d * S of exact in each implementation, S = max_v sum_k |h_k W_vk|; lse(z) - z_y is
    # 2-Lipschitz in max-norm, and each implementation's own lse rounds within (V + 4) u (2 + 4 max|z|)
    # (V exponentials of relative error u (1 + |z - max z|), their sum, the log and the final add).
    # DFT's summand f(lp) = -exp(lp) lp has |f'| = exp(lp) |1 + lp| <= 1 for lp <= 0, so a summand
    # moves by at most that log-prob error, plus a few roundings of the summands and of their sum.
    with torch.no_grad():
        labels = batch["labels"][:, 1:]
        h = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
        W = m.get_output_embeddings().weight
        z = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, :-1]
        mask = labels != -100
        lp = token_logprobs(z, labels.clamp(min=0))
        d, V = W.shape[1], W.shape[0]
        S = (h[mask].abs() @ W.abs().T).max().item()
        gamma_d = d * U64 / (1 - d * U64)
        zmax = z[mask].abs().max().item()
        dlogp = 2 * (2 * gamma_d * S) + 2 * (V + 4) * U64 * (2 + 4 * zmax)
        n = int(mask.sum())
        terms = (lp.exp() * lp)[mask].abs().sum().item()
        bound = dlogp + 2 * (n + 3) * U64 * terms / n
        got = dft_loss(lp, mask)
    assert abs(got.item() - theirs.item()) <= bound
    assert bound < 1e-3 * abs(theirs.item())       # the bound is far tighter than a wrong weight or count


# -- in the trainer ----------------------------------------------------------------------------
def _cfg(tmp_path, **kw):
    from percontrast.commands.train import TrainConfig
    base = dict(model="tiny-random", data="builtin:sample-train", task="email", k=2, learning_rate=1e-3,
                max_steps=2, batch_size=4, output_dir=str(tmp_path / "run"), progress=False, save_steps=0,
                save_total_limit=None, logging_steps=1, limit=4, lr_scheduler="constant")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method,refresh", [("nextquill", "step"), ("nextquill", "once"), ("dft", "step")])
def test_two_steps_move_every_trainable_parameter(tmp_path, sample_train, method, refresh):
    from percontrast.commands.train import build_trainer
    from percontrast.models import load_model

    model, tok = load_model("tiny-random")
    tr, _ = build_trainer(_cfg(tmp_path, method=method, refresh=refresh), model, tok, sample_train[:4])
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    assert before
    tr.train()
    after = dict(tr.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"parameters that did not move: {unchanged[:5]}"
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("mean_weight" in h for h in logs)
    if method == "nextquill":
        assert all({"mean_prob_gain", "share_above_margin", "aux_nll"} <= set(h) for h in logs)
        assert all(NEXTQUILL_LOW <= h["mean_weight"] <= NEXTQUILL_HIGH for h in logs)
        # the auxiliary term needs the profile-free forward with grad every step; once: cached weights
        assert tr.counterfactual_passes == 2
        assert [h["pir_refreshed"] for h in logs] == ([1.0, 1.0] if refresh == "step" else [1.0, 0.0])
    else:
        assert tr.counterfactual_passes == 0                  # dft needs no E-step
        assert all(0 < h["mean_weight"] < 1 for h in logs)    # mean p(y_i)


def _one_loss(tmp_path, sample_train, monkeypatch, **cfg):
    """Build a trainer, run compute_loss once in train mode; return (trainer, batch, the loss's kwargs)."""
    import percontrast.trainer as trainer_mod
    from percontrast.commands.train import build_trainer
    from percontrast.models import load_model

    model, tok = load_model("tiny-random")
    tr, _ = build_trainer(_cfg(tmp_path, method="nextquill", **cfg), model, tok, sample_train[:4])
    if cfg.get("lora"):
        torch.manual_seed(0)
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:   # LoRA starts with B = 0, where dropout on its input changes nothing
                p.data.normal_(0, 0.5)
    batch = next(iter(tr.get_train_dataloader()))
    seen = {}
    real = trainer_mod.LOSSES["nextquill"]
    monkeypatch.setitem(trainer_mod.LOSSES, "nextquill", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    tr.model.train()
    tr.compute_loss(tr.model, dict(batch), num_items_in_batch=int(batch["response_mask"].sum()))
    return tr, batch, seen


def _eval_mode_signals(model, batch):
    from percontrast.scoring import counterfactual_logits, score_batch, with_profile_logits
    model.eval()
    s = score_batch(model, batch)
    with torch.no_grad():
        diff = token_logprobs(with_profile_logits(model, batch) - counterfactual_logits(model, batch),
                              batch["response_ids"])
    return probability_gain(s.logp_with, s.logp_without), diff


def test_nextquill_signals_in_the_trainer_without_dropout(tmp_path, sample_train, monkeypatch):
    """No dropout: the E-step reads the auxiliary forward's detached log-probs (one profile-free forward,
    not two), and they are what eval-mode scoring gives: the same kernels on the same inputs, so equal."""
    tr, batch, seen = _one_loss(tmp_path, sample_train, monkeypatch)
    assert not tr.signal_needs_eval_pass and tr.counterfactual_passes == 1
    assert seen["diff_logp"].requires_grad and not seen["prob_gain"].requires_grad
    mask = batch["response_mask"].bool()
    gain, diff = _eval_mode_signals(tr.model, batch)
    assert torch.equal(seen["prob_gain"][mask], gain[mask])
    assert torch.equal(seen["diff_logp"].detach()[mask], diff[mask])


def test_nextquill_weights_see_no_dropout(tmp_path, sample_train, monkeypatch):
    """lora_dropout 0.5: the weights come from the eval-mode E-step (as for every other method), the
    auxiliary term from the dropout forward it trains through."""
    tr, batch, seen = _one_loss(tmp_path, sample_train, monkeypatch, lora=True, lora_dropout=0.5)
    assert tr.signal_needs_eval_pass and tr.counterfactual_passes == 2   # aux forward + eval-mode E-step
    mask = batch["response_mask"].bool()
    gain, diff = _eval_mode_signals(tr.model, batch)
    assert torch.equal(seen["prob_gain"][mask], gain[mask])
    assert not torch.equal(seen["diff_logp"].detach()[mask], diff[mask])  # the dropout forward, as theirs


def test_dft_takes_p_from_the_training_forward_like_trl(tmp_path, sample_train):
    from percontrast.commands.train import build_trainer
    from percontrast.models import load_model

    model, tok = load_model("tiny-random")
    tr, _ = build_trainer(_cfg(tmp_path, method="dft", lora=True, lora_dropout=0.5), model, tok, sample_train[:4])
    assert not tr.signal_needs_eval_pass
    assert LOSSES["dft"] is dft_loss
    # The loss gets the training forward's own log-probs (dropout on), and no E-step runs.
    import percontrast.trainer as trainer_mod
    from percontrast.pir import token_logprobs
    from percontrast.scoring import with_profile_logits
    torch.manual_seed(0)
    for n, p in tr.model.named_parameters():
        if "lora_B" in n:   # LoRA starts with B = 0, where dropout on its input changes nothing
            p.data.normal_(0, 0.5)
    batch = next(iter(tr.get_train_dataloader()))
    seen = []
    real = trainer_mod.LOSSES["dft"]
    trainer_mod.LOSSES["dft"] = lambda logp, mask, **kw: seen.append(logp.detach()) or real(logp, mask, **kw)
    try:
        tr.model.train()
        tr.compute_loss(tr.model, dict(batch), num_items_in_batch=int(batch["response_mask"].sum()))
    finally:
        trainer_mod.LOSSES["dft"] = real
    assert tr.counterfactual_passes == 0 and len(seen) == 1
    tr.model.eval()
    with torch.no_grad():
        eval_logp = token_logprobs(with_profile_logits(tr.model, batch), batch["response_ids"])
    mask = batch["response_mask"].bool()
    assert not torch.equal(seen[0][mask], eval_logp[mask])   # dropout changed them: p is the training forward's
