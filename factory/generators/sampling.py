"""Sample N rationales per problem with the HF or the vLLM backend: rows of the `samples` table.

Each row's sampling noise is seeded from (seed, problem_id, sample_index), and
its `sample_id` hashes everything that defines the request (problem, model,
generator, sampling params, index, seed). The same request is the same row, in
any batch, on any run: what makes resuming and caching exact. The generator is
the backend ("hf" or "vllm"): the two draw different noise from the same seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

from factory.executor import ExecutorConfig, worker_path
from factory.generators import vllm_backend
from factory.generators.decoding import DecodingConfig, generate
from factory.ids import content_hash, content_id, file_fingerprint
from factory.lineage import model_id as model_id_of
from factory.lineage import read_table, write_table
from factory.modeling import check_model, format_prompt, load_model
from factory.schema import from_rows
from factory.shards import clear_shards, run_in_shards, shard_dir_for

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig(DecodingConfig):
    """How many rationales to draw per problem, and how (params.yaml `sample`): decoding plus the run."""

    temperature: float = 0.7  # DPO-ST samples at T=0.7
    n: int = 4
    seed: int = 0
    split: str = "answers"  # the pool sampled by `factory sample`; several joined by "+" (answers+unlabeled)
    limit: int = 500  # sample only the first `limit` problems of each split (0: all)
    shard_size: int = 64  # problems per checkpointed shard
    backend: str = "hf"  # hf (transformers, CPU or GPU) | vllm (GPU; pip install 'factory[vllm]')

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("n", 1), ("limit", 0), ("shard_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)!r}"
                                 + (" (0: the whole split)" if name == "limit" else ""))
        if not self.split or any(not part for part in self.split.split("+")):
            raise ValueError(f"split must name one or more splits joined by '+', got {self.split!r}")

    def request_params(self) -> dict:
        """The decoding settings that change a sample's text (batch size does not)."""
        return {f.name: getattr(self, f.name) for f in fields(DecodingConfig) if f.name != "batch_size"}


def check_backend(config: SamplingConfig) -> None:
    """Fail before any work when the params name an unknown backend or one this machine lacks."""
    if config.backend not in BACKENDS:
        raise ValueError(f"sample.backend must be one of {', '.join(BACKENDS)}, got {config.backend!r}")
    if config.backend == "vllm":
        vllm_backend.require_vllm()


def row_seed(seed: int, problem_id: str, sample_index: int) -> int:
    """A 63-bit seed for one sample's noise, independent of batching."""
    return int(content_hash(seed, problem_id, sample_index), 16) & (2**63 - 1)


def sample_rationales(
    model,
    tokenizer,
    problems: list[dict],
    config: SamplingConfig,
    *,
    model_id: str,
    iteration: int,
    show_progress: bool = True,
) -> list[dict]:
    """`config.n` samples for each problem, as `samples` rows (problem-major, then sample_index).

    `model` is the HF model, or with `config.backend` "vllm" an engine from `vllm_backend.load_engine`.
    """
    requests = [(p, index) for p in problems for index in range(config.n)]
    prompts = [format_prompt(tokenizer, p["question"]) for p, _ in requests]
    seeds = [row_seed(config.seed, p["problem_id"], index) for p, index in requests]
    decode = vllm_backend.generate if config.backend == "vllm" else generate
    completions = decode(model, tokenizer, prompts, seeds, config, desc="sample", show_progress=show_progress)
    params = config.request_params()
    rows = []
    for (problem, index), completion in zip(requests, completions):
        rows.append(
            {
                "sample_id": content_id(
                    "sample", problem["problem_id"], model_id, config.backend, params, config.seed, index
                ),
                "problem_id": problem["problem_id"],
                "iteration": iteration,
                "model_id": model_id,
                "generator": config.backend,
                "parent_sample_id": None,
                "prefix_steps": None,
                "sample_index": index,
                "seed": config.seed,
                "temperature": config.temperature,
                "top_p": config.top_p,
                "max_new_tokens": config.max_new_tokens,
                "calculator": config.calculator,
                "text": completion.text,
                "n_tokens": completion.n_tokens,
                "finish_reason": completion.finish_reason,
            }
        )
    return rows


def problems_to_sample(problems: list[dict], config: SamplingConfig, *, source: str = "<problems>") -> list[dict]:
    """The first `config.limit` problems (0: all) of each split named in `config.split`, split by split.

    >>> rows = [{"split": s, "problem_id": f"{s}-{i}"} for s in ("answers", "unlabeled") for i in range(3)]
    >>> [p["problem_id"] for p in problems_to_sample(rows, SamplingConfig(split="unlabeled+answers", limit=2))]
    ['unlabeled-0', 'unlabeled-1', 'answers-0', 'answers-1']
    """
    chosen = []
    for split in config.split.split("+"):
        pool = [p for p in problems if p["split"] == split]
        if not pool:
            raise ValueError(f"{source}: no problems in split {split!r}")
        chosen += pool[: config.limit] if config.limit else pool
    return chosen


def load_sampler(model_dir: str, config: SamplingConfig):
    """The model and tokenizer `sample_rationales` decodes with: the HF model, or a vLLM engine."""
    if config.backend == "vllm":
        return vllm_backend.load_engine(model_dir, seed=config.seed)
    return load_model(model_dir)


def sample_shard(loaded, shard: list[dict], *, config: SamplingConfig, model_id: str, iteration: int) -> list[dict]:
    """One shard's `samples` rows, from the (model, tokenizer) of `load_sampler`: what a worker runs."""
    model, tokenizer = loaded
    return sample_rationales(model, tokenizer, shard, config, model_id=model_id, iteration=iteration,
                             show_progress=False)


def sample_to_file(
    *, model_dir: str, problems_path: str, out: str, config: SamplingConfig, iteration: int,
    shard_dir: Path | None = None, executor: ExecutorConfig | None = None,
) -> int:
    """The `sample` stage: N rationales per problem of `config.split`, checkpointed in shards.

    Killed and restarted with the same inputs and params, it resumes from the
    finished shards and writes exactly the bytes an uninterrupted run writes.
    Shards go to `shard_dir` (default: beside `out`) and run where `executor`
    says (default: this process), which changes no byte. Returns the number of rows written.
    """
    check_backend(config)
    problems = problems_to_sample(read_table(problems_path, "problems").to_pylist(), config, source=problems_path)
    mid = model_id_of(model_dir)
    # Batch and shard sizes change no row; the shard size still keys the checkpoints it cut.
    params = {k: v for k, v in asdict(config).items() if k not in ("batch_size", "shard_size")}
    fingerprint = content_hash(mid, file_fingerprint(problems_path), params, iteration, config.shard_size)
    check_model(model_dir)  # the workers load it: a model that is not there fails before any shard starts
    shard_dir = shard_dir or shard_dir_for(out)
    rows = run_in_shards(
        problems, partial(sample_shard, config=config, model_id=mid, iteration=iteration),
        load=partial(load_sampler, worker_path(model_dir), config), executor=executor,
        shard_size=config.shard_size, shard_dir=shard_dir, fingerprint=fingerprint, kind="samples", desc="sample",
    )
    write_table(
        from_rows(rows, "samples", source=out), out, kind="samples", stage="sample", params=params,
        inputs={"problems": problems_path}, model_id=mid,
    )
    clear_shards(shard_dir)
    return len(rows)
