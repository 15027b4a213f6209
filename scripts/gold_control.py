"""Gold-only control: continue SFT on the gold rationales from a model; does test accuracy move?

    python scripts/gold_control.py --model models/iter_0 --problems data/problems.parquet \
        --out models/control --epochs 4 --lr 1e-3

A gain from self-generated data counts only against this: the same model given
more SFT on gold alone. Prints the dev curve and test accuracy per split.
"""

from __future__ import annotations

import argparse
import json

from factory.evaluate import EvalConfig, evaluate
from factory.lineage import read_table
from factory.modeling import TinyModelConfig, load_model
from factory.params import load_params, section
from train.sft import WarmupConfig, main


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder to continue from")
    parser.add_argument("--problems", required=True)
    parser.add_argument("--out", required=True, help="folder for the continued model")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--params", default="params.yaml", help="warm-up settings to reuse (batch size, loss)")
    args = parser.parse_args()

    warmup = section(load_params(args.params), "warmup", WarmupConfig, path=args.params)
    config = WarmupConfig(
        **{**vars(warmup), "base_model": args.model, "learning_rate": args.lr, "max_epochs": args.epochs,
           "min_epochs": args.epochs, "warmup_steps": 20}
    )
    problems = read_table(args.problems, "problems").to_pylist()
    summary = main(problems=problems, out_dir=args.out, config=config, tiny=TinyModelConfig())
    print(json.dumps({"curve": summary["curve"]}))
    model, tokenizer = load_model(args.out)
    evaluation = evaluate(model, tokenizer, [p for p in problems if p["split"] in ("test", "test_ood")],
                          EvalConfig(), show_progress=False)
    print(json.dumps({"control": evaluation.metrics()}))


if __name__ == "__main__":
    run()
