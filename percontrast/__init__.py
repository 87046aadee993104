"""percontrast: PerContrast token scores and PerCE training for personalized LLMs.

The two formulas are plain functions on tensors:

    from percontrast import pir, perce_loss
    w_pir = pir(logp_with_profile, logp_without_profile)            # [B, R]
    loss = perce_loss(logp_with_profile, mask, pir=w_pir)            # clip(PIR, 0.8, 5.0), detached

Commands (``percontrast --help``) and their config dataclasses live in one module each
under ``percontrast.commands``; record producers (LongLaMP/LaMP, corpora, synthetic
personas) under ``percontrast.datasets``. See ARCHITECTURE.md.
"""
from . import _moved
from .losses import LOSSES, ce_loss, clip_weights, entce_loss, lossce_loss, perce_loss, weighted_nll
from .pir import pir, token_entropy, token_logprobs

_moved.install()   # old module paths (percontrast.train, ...) keep working for one release


def __getattr__(name: str):
    # score_text lives with the score command; imported on first use so that importing the
    # formulas does not load the command layer
    if name == "score_text":
        from .commands.score import score_text
        return score_text
    raise AttributeError(f"module 'percontrast' has no attribute {name!r}")

__version__ = "0.2.0"
__all__ = ["pir", "token_logprobs", "token_entropy", "clip_weights", "weighted_nll", "ce_loss", "perce_loss",
           "lossce_loss", "entce_loss", "LOSSES", "score_text", "__version__"]
