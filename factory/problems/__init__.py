"""Problem sources: the synthetic `arith` task, GSM8K, JSONL files and Hub datasets.

A source spec is `arith`, `gsm8k:PATH_OR_HUB_ID`, `jsonl:PATH` or `hf:NAME`.
Every source returns `(problems, dropped)`: rows it could not use are kept with
their reason, never silently lost.
"""

from __future__ import annotations

from pathlib import Path

SOURCES = ("arith", "gsm8k", "jsonl", "hf")


def load_source(spec: str, *, split: str | None = None, arith_config=None) -> tuple[list[dict], list[dict]]:
    kind, _, target = spec.partition(":")
    if kind == "arith":
        from factory.problems.arith import ArithConfig, generate_problems

        problems = generate_problems(arith_config or ArithConfig())
        return ([p for p in problems if p["split"] == split] if split else problems), []
    if not target:
        raise ValueError(f"problem source {spec!r}: expected one of arith, gsm8k:PATH, jsonl:PATH, hf:NAME")
    from factory.problems import files

    loaders = {"gsm8k": files.load_gsm8k, "jsonl": files.load_jsonl, "hf": files.load_hf}
    if kind not in loaders:
        raise ValueError(f"problem source {spec!r}: unknown kind {kind!r}; expected one of {list(SOURCES)}")
    return loaders[kind](target, split=split)


def source_inputs(spec: str) -> dict[str, str]:
    """The local files a source reads, for provenance fingerprints."""
    _, _, target = spec.partition(":")
    return {"source": target} if target and Path(target).is_file() else {}
