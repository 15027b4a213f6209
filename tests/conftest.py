"""Shared fixtures: offline, no analytics, and a tiny model built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

TOY_TEXTS = [
    "Mia has 12 marbles. She buys 7 more. How many marbles does Mia have?\n"
    "Mia has 12+7=<<12+7=19>>19 marbles.\n#### 19",
    "Tom has 3 boxes with 4 pens in each box. How many pens?\nTom has 3*4=<<3*4=12>>12 pens.\n#### 12",
    "Ann had 20 coins and gave away 5. Then she found 2.\nShe kept 20-5=<<20-5=15>>15 coins.\n"
    "Then 15+2=<<15+2=17>>17 coins.\n#### 17",
] * 20


@pytest.fixture(scope="session")
def tiny_model():
    """(model, tokenizer): an untrained tiny Llama with a tokenizer trained on toy task text."""
    from factory.modeling import TinyModelConfig, build_tiny_model, train_tokenizer

    tokenizer = train_tokenizer(TOY_TEXTS, vocab_size=300)
    config = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, max_length=256)
    model = build_tiny_model(tokenizer, config)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory):
    """(folder, tokenizer): the tiny model saved as a model folder, for code that loads models from disk."""
    model, tokenizer = tiny_model
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer
