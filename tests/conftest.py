"""Shared fixtures: the tiny random model (2 layers, hidden 64, SmolLM2's tokenizer) and sample data."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer); the model is rebuilt per test via ``fresh_tiny`` when a test trains it."""
    from percontrast.models import load_model
    model, tok = load_model("tiny-random")
    model.eval()
    return model, tok


@pytest.fixture
def fresh_tiny():
    from percontrast.models import load_model
    return load_model("tiny-random")


@pytest.fixture(scope="session")
def email_task():
    from percontrast.prompts import get_task
    return get_task("email")


@pytest.fixture(scope="session")
def sample_train(email_task):
    from percontrast.datasets import load_records
    return load_records("builtin:sample-train", email_task)
