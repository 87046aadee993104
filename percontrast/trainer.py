"""``PerCETrainer``: a ``transformers.Trainer`` whose loss is one of ``losses.METHODS``.

The method itself is ``PerCELossMixin``: ``PerCETrainer`` is that mixin on the stock Trainer, and
``trl_sft.PerCESFTTrainer`` is the same mixin on TRL's ``SFTTrainer``; both feed it
``PairedCollator`` batches, so there is one E-step, one loss and one cache.

One training step (the paper's bootstrap, "EM"):
  E-step  a separate top-level no-grad forward of the *current* model on the
          profile-free input gives log p(y_i | x, y_<i); PIR = logp_with.detach() - that.
  M-step  the normal with-profile forward (with grad) gives log p(y_i | p, x, y_<i);
          loss = sum_i clip(PIR_i, m, M) * -logp_i / n, n = response tokens of the
          whole optimizer step (``num_items_in_batch``), so gradient accumulation and
          several processes give the same gradient as one big batch.

Cheaper variants (ours, not the paper's; labelled in logs): ``refresh="every_k"``
re-estimates PIR on optimizer steps divisible by ``refresh_every``; on the other steps each
example reuses the PIR cached at its last visit (an example never seen is computed). So
the first epoch costs what the paper's bootstrap costs and later epochs about 1/k of the
E-steps. ``refresh="once"`` computes each example's PIR once, with the model as it is when
the example is first seen, and never again. Under several processes the ranks agree on
whether a micro-batch runs the E-step (one all-reduce: FSDP and ZeRO-3 need every rank to
run the same forwards) and share what they computed, so every rank's cache, and the one
rank 0 checkpoints, holds every example: N processes behave like one.

``threshold`` uses the same PIR (and cache); ``jsd`` keeps the profile-free logits of the E-step
and weighs by the Jensen-Shannon divergence of the two next-token distributions (``losses.py``).
``nextquill`` caches the gold token's probability gain p_with - p_without the same way; its
auxiliary term needs the profile-free logits *with* gradient (NextQuill's code trains through both
forwards), so that forward runs every step whatever ``refresh`` says, and when the model has no
dropout the E-step reads its detached log-probs instead of running a no-grad pass of its own
(``refresh`` then changes how fresh the weights are, not the cost). ``dft`` has no E-step: its
weight p(y_i) is the training forward's own, detached, as TRL takes it (also under dropout).

Weights never see dropout: the E-step runs in eval mode, and when the model has dropout
(``lora_dropout``, ``attention_dropout``, ...) the with-profile log-probs behind PIR (and the
LossCE / EntCE signals) come from an extra no-grad eval-mode forward instead of the training
forward, so the weights are the ones ``percontrast score`` reports for the same model.

``--on-nonfinite skip``: a skipped micro-batch adds no gradient, but the Trainer counted its
response tokens in ``num_items_in_batch`` before any forward ran, so the step's update is the
one in which the skipped tokens had weight 0 (the kept micro-batches' gradient divided by the
step's full token count). ``tests/test_trainer.py`` checks this against a hand computation.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import contextmanager

import torch
from transformers import Trainer

from .checkpointing import AtomicCheckpointMixin
from .errors import UserError
from .losses import (CONTRAST_METHODS, LOSSES, NEXTQUILL_MARGIN, clip_weights, nextquill_weights, probability_gain,
                     relative_jsd, threshold_weights)
from .options import LossOptions
from .pir import js_divergence, token_entropy, token_logprobs, upcast
from .scoring import (counterfactual_logits, counterfactual_logp, counterfactual_response_logits,
                      naive_counterfactual_logits, naive_counterfactual_logp, naive_counterfactual_response_logits,
                      naive_with_profile_logp, with_profile_logits)

logger = logging.getLogger(__name__)


# The trainer reads the loss options as ``TrainConfig`` declares them (options.LossOptions);
# the old name stays for code written against it.
PerCEArgs = LossOptions


def refresh_label(p: LossOptions) -> str:
    """How the PIR weights are refreshed, in words, so logs never pass a cheaper variant off as the paper's."""
    label = {"step": "refresh=step (every step, the paper's bootstrap)",
             "every_k": f"refresh=every_k (k={p.refresh_every}: per-example cache, ours, not the paper's)",
             "once": "refresh=once (first time an example is seen, ours, not the paper's)"}[p.refresh]
    return label + ("" if p.fast else ", naive implementation")


class NonFiniteLossError(UserError):
    pass


def has_dropout(model) -> bool:
    """True when a forward in train mode is random: a dropout module with p > 0, or a config
    dropout rate > 0 (attention dropout is often applied functionally, with no module)."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "to_dict")}
    for c in configs.values():
        for k, v in c.to_dict().items():
            if ("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return True
    return False


@contextmanager
def eval_mode(model):
    """Dropout off for a no-grad signal pass, then back to the mode the model was in."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class PerCELossMixin:
    """The E-step and the weighted loss (the M-step) on ``PairedCollator`` batches, mixed in before a
    ``transformers.Trainer`` subclass. ``PerCETrainer`` below and ``trl_sft.PerCESFTTrainer`` are both
    this mixin plus their own data plumbing, so the two trainers cannot drift apart in the method."""

    # best_snapshot: --keep-best's weights (train.ValidationCurve), in checkpoints so --resume keeps them
    extra_state_attrs = ("_pir_cache", "skipped_nonfinite", "best_snapshot")

    # compute_loss already divides by the step's token count (num_items_in_batch).
    loss_is_scaled_for_ga = True

    def __init__(self, *args, perce_args: LossOptions | None = None, example_ids: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Count response tokens (labels != -100) for num_items_in_batch even for a model whose
        # forward has no **kwargs; compute_loss below is ours, so nothing else reads this flag.
        self.model_accepts_loss_kwargs = True
        self.perce = perce_args or LossOptions()
        self.example_ids = example_ids
        self._pir_cache: dict[int, torch.Tensor] = {}   # example idx -> PIR of its response tokens [n_i]
        # Not ``_metrics``: TRL's trainers keep their own metrics dict under that name.
        self._perce_metrics: dict[str, list[float]] = defaultdict(list)
        self.skipped_nonfinite = 0
        self.best_snapshot: dict | None = None   # {"step", "val_nll", "params": {name: CPU tensor}}
        self.counterfactual_passes = 0   # E-step forwards run (refresh=every_k/once cache them)
        # A weighted loss whose weights would see dropout recomputes them in eval mode (see top); dft's
        # weight is part of its formula on the training forward (as in TRL), not a separate signal.
        self.signal_needs_eval_pass = self.perce.method not in ("ce", "dft") and has_dropout(self.model)
        if self.perce.method in CONTRAST_METHODS:
            logger.info("%s weights: %s", self.perce.method, refresh_label(self.perce))

    # -- E-step ---------------------------------------------------------------------
    def _cf_logp(self, model, inputs) -> torch.Tensor:
        self.counterfactual_passes += 1
        with eval_mode(model):
            return (counterfactual_logp if self.perce.fast else naive_counterfactual_logp)(model, inputs)

    def _cf_logits(self, model, inputs) -> torch.Tensor:
        """Profile-free logits [B, R, V] (jsd needs the whole distribution, not the gold token's log-prob)."""
        self.counterfactual_passes += 1
        with eval_mode(model):
            return (counterfactual_logits if self.perce.fast else naive_counterfactual_logits)(model, inputs)

    def _cf_logits_with_grad(self, model, inputs) -> torch.Tensor:
        """Profile-free logits [B, R, V] WITH gradient, in the model's current (training) mode: NextQuill's
        auxiliary term trains through this forward, so it is not the no-grad E-step."""
        self.counterfactual_passes += 1
        fn = counterfactual_response_logits if self.perce.fast else naive_counterfactual_response_logits
        return fn(model, inputs)

    def _signal_logits(self, model, inputs, logp: torch.Tensor, logits: torch.Tensor):
        """(log-probs [B, R], logits [B, R, V]) with the profile, detached, as the weights must see
        them: from the training forward, or from a no-grad eval-mode forward when it had dropout."""
        if not (self.signal_needs_eval_pass and model.training):   # an eval-mode forward saw no dropout already
            return logp.detach(), logits.detach()
        with torch.no_grad(), eval_mode(model):
            return self._with_profile_forward(model, inputs)

    def _any_rank(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.args.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def _share(self, entries: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every rank's new cache entries, on every rank (examples are spread over ranks)."""
        if self.accelerator.num_processes == 1:
            return entries
        import torch.distributed as dist
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, entries)
        return {i: v for part in gathered for i, v in part.items()}

    def _pir(self, model, inputs, logp_with) -> torch.Tensor:
        """PIR [B, R] for this batch, fresh or from the per-example cache. ``logp_with()`` gives the
        detached with-profile log-probs; it is called only when PIR is re-estimated, so a cached step
        with a dropout model skips the extra eval-mode forward too."""
        return self._contrast_signal(inputs, lambda: logp_with() - self._cf_logp(model, inputs))

    def _jsd(self, model, inputs, logits_with) -> torch.Tensor:
        """JS divergence [B, R] between the with-profile (``logits_with()``) and profile-free
        next-token distributions, fresh or cached like PIR."""
        return self._contrast_signal(inputs, lambda: js_divergence(logits_with(), self._cf_logits(model, inputs)))

    def _nextquill(self, model, inputs, logp, logits) -> dict[str, torch.Tensor]:
        """NextQuill's two inputs: ``prob_gain`` [B, R] = p_with - p_without of the gold token (the E-step's
        signal, fresh or cached like PIR) and ``diff_logp`` [B, R] = log softmax(z_with - z_without)[y], with
        gradient through both forwards (the auxiliary term)."""
        targets = inputs["response_ids"]
        cf_logits = self._cf_logits_with_grad(model, inputs)                     # [B, R, V], with grad
        # Upcast before subtracting: two close bf16 logits would lose their difference's digits.
        diff_logp = token_logprobs(upcast(logits) - upcast(cf_logits), targets)

        def fresh() -> torch.Tensor:
            if self.signal_needs_eval_pass and model.training:   # weights never see dropout: the eval-mode E-step
                return probability_gain(self._signal_logits(model, inputs, logp, logits)[0],
                                        self._cf_logp(model, inputs))
            # No dropout: train and eval mode compute the same, so the auxiliary forward is the E-step's.
            return probability_gain(logp.detach(), token_logprobs(cf_logits.detach(), targets))

        return {"prob_gain": self._contrast_signal(inputs, fresh), "diff_logp": diff_logp}

    def _contrast_signal(self, inputs, fresh_fn) -> torch.Tensor:
        """The E-step's per-token signal [B, R]: ``fresh_fn()`` every step (the paper's bootstrap), or
        the per-example cache of --refresh every_k / once (see the module docstring)."""
        p = self.perce
        if not self.model.training:
            # An evaluation batch's ``idx`` numbers rows of the eval set, not of the training set the
            # cache is keyed by: always fresh, and not counted in the training logs.
            return fresh_fn()
        if p.refresh == "step":
            self._perce_metrics["pir_refreshed"].append(1.0)
            return fresh_fn()
        step = self.state.global_step
        # every_k: optimizer steps divisible by k re-estimate their whole batch; other steps reuse
        # each example's cached PIR (from its last visit) and compute only examples never seen.
        refresh_all = p.refresh == "every_k" and step % p.refresh_every == 0
        idx = inputs["idx"].tolist()
        lengths = inputs["response_mask"].sum(-1).tolist()
        stale = [refresh_all or i not in self._pir_cache for i in idx]
        # All ranks run the E-step if any needs it (a forward only some ranks run hangs FSDP / ZeRO-3).
        if self._any_rank(any(stale)):
            fresh = fresh_fn()
            new = {i: fresh[b, : lengths[b]].cpu() for b, i in enumerate(idx) if stale[b]}
            self._pir_cache.update(self._share(new))
            self._perce_metrics["pir_refreshed"].append(sum(stale) / len(idx))
        else:
            self._perce_metrics["pir_refreshed"].append(0.0)
        cached = [self._pir_cache[i] for i in idx]
        out = torch.zeros(inputs["response_mask"].shape, dtype=cached[0].dtype, device=inputs["response_mask"].device)
        for b, c in enumerate(cached):
            out[b, : lengths[b]] = c.to(out.device)
        return out

    # -- M-step ---------------------------------------------------------------------
    def _with_profile_forward(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [B, R], logits [B, R, V]) of the gold tokens with the profile (with grad where
        grad is on: the training forward; the signal pass calls it under no_grad)."""
        if self.perce.fast:
            logits = with_profile_logits(model, inputs)
            return token_logprobs(logits, inputs["response_ids"]), logits
        return naive_with_profile_logp(model, inputs)

    def _checked_and_scaled(self, model, inputs, loss, num_items_in_batch, extra: dict) -> torch.Tensor:
        """The loss after the non-finite check (training only: an evaluation reports what it gets, a
        NaN eval loss shows; it never skips or stops) and scaled for DDP, which averages gradients over
        processes while num_items_in_batch counts every process's tokens."""
        if model.training:
            self._check_finite(loss, inputs, {k: v for k, v in extra.items() if torch.is_tensor(v)})
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        p = self.perce
        mask = inputs["response_mask"]
        logp, logits = self._with_profile_forward(model, inputs)   # [B, R], [B, R, V]
        extra = {}
        if p.method in ("perce", "threshold"):
            extra["pir"] = self._pir(model, inputs, lambda: self._signal_logits(model, inputs, logp, logits)[0])
            if p.method == "threshold":
                extra["margin"] = p.threshold_margin
        elif p.method == "jsd":
            extra["jsd"] = self._jsd(model, inputs, lambda: self._signal_logits(model, inputs, logp, logits)[1])
        elif p.method == "nextquill":
            extra.update(self._nextquill(model, inputs, logp, logits))
        elif p.method not in ("ce", "dft"):   # dft's weight is exp(logp) itself (losses.dft_loss)
            sig_logp, sig_logits = self._signal_logits(model, inputs, logp, logits)
            if p.method == "entce":
                extra["entropy"] = token_entropy(sig_logits)
            else:
                extra["token_loss"] = -sig_logp
        loss = LOSSES[p.method](logp, mask, clip_min=p.clip_min, clip_max=p.clip_max, normalize=p.normalize,
                                num_items=num_items_in_batch, **extra)
        loss = self._checked_and_scaled(model, inputs, loss, num_items_in_batch, extra)
        if model.training:
            self._record(p, logp.detach(), mask, extra)
        return (loss, {"logits": logits}) if return_outputs else loss

    def _check_finite(self, loss, inputs, extra):
        bad = not torch.isfinite(loss).item()
        for v in extra.values():
            bad = bad or not torch.isfinite(v[inputs["response_mask"].bool()]).all().item()
        mine = bad
        if self.accelerator.num_processes > 1:
            # All ranks skip (or stop) together: a rank that skipped its backward alone would stall DDP.
            flag = torch.tensor([float(bad)], device=loss.device)
            bad = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if not bad:
            return
        ids = inputs["idx"].tolist()
        names = [self.example_ids[i] for i in ids] if self.example_ids else ids
        if not mine:
            names = f"on another process (this one had {names})"
        if self.perce.on_nonfinite == "skip":
            self.skipped_nonfinite += 1
            self._perce_metrics["nonfinite_skipped"].append(1.0)
            raise _SkipStep()
        raise NonFiniteLossError(f"non-finite loss or weight at step {self.state.global_step + 1} "
                                 f"for examples {names}; lower the learning rate or pass --on-nonfinite skip")

    def training_step(self, model, inputs, num_items_in_batch=None):
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except _SkipStep:
            return torch.tensor(0.0, device=self.args.device)

    def _record(self, p: LossOptions, logp, mask, extra):
        m = mask.bool()
        if not m.any():
            return
        signal = {"perce": extra.get("pir"), "lossce": extra.get("token_loss"), "entce": extra.get("entropy"),
                  "threshold": extra.get("pir"), "jsd": extra.get("jsd"), "nextquill": extra.get("prob_gain"),
                  "dft": logp.exp() if p.method == "dft" else None}.get(p.method)
        if signal is None:
            self._perce_metrics["mean_weight"].append(1.0)
            return
        if p.method == "nextquill":
            # mean_weight: of the two-level weights before their sum divides them (0.1 .. 0.9)
            w = nextquill_weights(signal)
            self._perce_metrics["mean_prob_gain"].append(signal[m].mean().item())
            self._perce_metrics["share_above_margin"].append((signal[m] > NEXTQUILL_MARGIN).float().mean().item())
            self._perce_metrics["aux_nll"].append(-extra["diff_logp"].detach()[m].mean().item())
        elif p.method == "dft":
            w = signal   # p(y_i), the DFT weight
        elif p.method == "threshold":
            w = threshold_weights(signal, p.threshold_margin, p.clip_min, p.clip_max)
        elif p.method == "jsd":
            w = clip_weights(relative_jsd(signal, mask), p.clip_min, p.clip_max)
            self._perce_metrics["mean_jsd"].append(signal[m].mean().item())
        else:
            w = clip_weights(signal, p.clip_min, p.clip_max)
        self._perce_metrics["mean_weight"].append(w[m].mean().item())
        if p.method in ("perce", "threshold"):
            self._perce_metrics["mean_pir"].append(signal[m].mean().item())
            self._perce_metrics["share_pir_above_min"].append((signal[m] > p.clip_min).float().mean().item())

    def log(self, logs: dict, *args, **kwargs) -> None:
        # Attach the averages since the last log to the training logs (TRL does the same).
        if "loss" in logs and self._perce_metrics:
            for k, v in self._perce_metrics.items():
                logs[k] = round(sum(v) / len(v), 6)
            self._perce_metrics.clear()
        super().log(logs, *args, **kwargs)


class PerCETrainer(PerCELossMixin, AtomicCheckpointMixin, Trainer):
    """Trainer for paired (with-profile / profile-free) batches from ``PairedCollator``.
    Checkpoints are written atomically (``checkpointing.py``) and carry the PIR cache."""


class _SkipStep(Exception):
    pass
