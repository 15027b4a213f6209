"""The baselines every recipe is measured against: `sft`, `self_train` and `dpo`.

- `sft`, the gold-only control: more SFT on the gold rationales from the
  previous model, for the same number of optimizer steps (`self_train.max_steps`)
  as every other recipe. A recipe's gain counts only beyond it.
- `self_train` (STaR-style self-training, Zelikman et al., 2022): no DPO. It
  draws the same second round of samples from the previous model as `dpo_st`
  draws from its DPO model, so both spend the same sampling budget, and SFTs
  the base on gold plus the correct filtered samples of both rounds.
- `dpo`: ScPO's training (weighted DPO + NLL from the previous model, which is
  the iteration's model) on gold-judged pairs (the `dpo_st` rule): ScPO's
  supervised counterpart (IRPO-style), which tells what the votes cost
  against gold labels. It draws 8 samples per problem, ScPO's budget.
"""

from __future__ import annotations

from factory.recipes import dpo_st
from factory.recipes.base import Recipe, register


def train_sft(it) -> dict:
    """SFT on gold from the previous model."""
    from train import iteration as blocks

    return blocks.sft(it, blocks.gold(it), it.start(), init="prev")


def train_self_train(it) -> dict:
    """A second round from the previous model, pooled with the first; SFT of the base on gold + correct samples."""
    from train import iteration as blocks

    summary = it.start()
    examples = blocks.second_round(it, it.prev_dir, summary, pool_first_round=True)
    return blocks.sft(it, examples, summary, init=it.self_train.init)


def train_dpo(it) -> dict:
    """Weighted DPO + NLL from the previous model on the iteration's pairs: that model is the iteration's."""
    from train import iteration as blocks

    return blocks.dpo_model(it, blocks.read_pairs(it), it.start())


SFT = register(Recipe(
    module=__name__, name="sft", paper="the gold-only control", train=train_sft,
    summary="more SFT on gold from the previous model, the same optimizer steps"))
SELF_TRAIN = register(Recipe(
    module=__name__, name="self_train", paper="self-training (Zelikman et al., 2022)", train=train_self_train,
    samples_again=True, precondition=dpo_st.needs_correct_samples,
    summary="no DPO: a second round of samples; the base retrained on gold + correct samples of both rounds"))
DPO = register(Recipe(
    module=__name__, name="dpo", paper="ScPO's supervised counterpart (Prasad et al., 2024)", train=train_dpo,
    pairs=dpo_st.PAIRS, setup={"sample.n": 8}, precondition=dpo_st.needs_correct_samples,
    summary="weighted DPO + NLL on gold-judged pairs; that model is the iteration's"))
