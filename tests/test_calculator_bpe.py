"""The calculator with real BPE vocabularies: `=` merged into other tokens, results forced as exact ids.

A model's `=` may arrive inside a larger token: SmolLM2 has `Ġ=` (" ="), `)=`, `==`; a BPE trained on
GSM8K-like text may merge `=2` or `=\\n`. The decoder watches every token whose text holds `=`, and at
such a token asks `calculator_completion` what is still owed:
- the token ends at the `=` (`)=`, ` =`): the whole result and `>>` are forced;
- the token carries the start of the right result (`=2` before 24): only the rest (`4>>`) is forced;
- the token carries anything else (`=3` before 24, `==`, `=\\n`): the model has contradicted the result,
  so the calculator backs off for that `=` and the model goes on on its own (the label stage's
  calculator check then counts the annotation as wrong).
The forced text goes in as ids that decode to exactly that text after what the row already holds
(`forced_ids`), checked on a tokenizer that marks word starts (SentencePiece's `▁`) as well.
"""

import pytest

from factory.generators import vllm_backend
from factory.generators.decoding import DecodingConfig, _watched_tokens, calculator_completion, forced_ids, generate
from factory.generators.vllm_backend import Segment
from test_decoding import ScriptedLM

EOS = "</s>"


def merged_tokenizer(*, metaspace: bool = False):
    """A hand-built byte-level BPE whose merges glue `=` to its neighbours: `=2`, `)=`, ` =`, `==`, `=\\n`.

    No pre-tokenizer regex, so merges cross digits and punctuation as they may in a real vocabulary.
    With `metaspace`, a SentencePiece-style tokenizer instead: `▁` marks a word start, and text encoded
    alone starts a word (`24>>` -> `▁24>>`), which in the middle of a row would write a space.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if metaspace:
        alphabet = sorted(set("0123456789+-*/()<>=.#\n abcdefghijklmnopqrstuvwxyzQ:") - {" "}) + ["▁"]
        merges = [("2", "4"), ("▁", "2"), ("▁2", "4"), ("<", "<"), (">", ">"), ("▁", "=")]
        vocab = {token: i for i, token in enumerate([EOS, *alphabet, *("".join(m) for m in merges)])}
        model = models.BPE(vocab=vocab, merges=merges)
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    else:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        merges = [("=", "2"), ("=", "3"), (")", "="), ("Ġ", "="), ("=", "="), ("=", "Ċ"), ("2", "4"), ("4", "8"),
                  ("<", "<"), (">", ">")]
        vocab = {token: i for i, token in enumerate([EOS, *sorted(alphabet), *("".join(m) for m in merges)])}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, padding_side="left")
    return wrapped


@pytest.fixture(scope="module")
def bpe():
    return merged_tokenizer()


def token(tokenizer, piece: str) -> int:
    """The id of one vocabulary entry by its text ("=2", ")=", " =")."""
    ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == piece]
    assert len(ids) == 1, f"{piece!r} is not one token: {ids}"
    return ids[0]


def ids_of(tokenizer, *parts: str) -> list[int]:
    """Ids spelling `parts` in order: a part in [brackets] is one token, any other is spelled one token a character."""
    ids = []
    for part in parts:
        if part.startswith("[") and part.endswith("]"):
            ids.append(token(tokenizer, part[1:-1]))
        else:
            ids += [token(tokenizer, c) for c in part]
    return ids


IdScriptLM = ScriptedLM  # fed token ids: merged tokens are spelled exactly as the test means them


def decode_script(tokenizer, script: list[int], prompt: str = "Q: x\n", max_new_tokens: int = 40):
    config = DecodingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop_at_final_answer=False)
    [completion] = generate(IdScriptLM(tokenizer, [script]), tokenizer, [prompt], [0], config, show_progress=False)
    return completion


def with_room(tokenizer, written: list[int], owed: str, tail: list[int]) -> list[int]:
    """A script: `written`, then one filler id per id the calculator forces for `owed` (replaced), then `tail`."""
    filler = tokenizer.encode("9", add_special_tokens=False)
    return written + filler * len(forced_ids(tokenizer, owed)) + tail


def test_the_hand_built_vocabulary_really_merges_equals_signs(bpe):
    pieces = [bpe.decode([i]) for i in bpe.encode("(3+4)=7 24 48/2=2 a =1 b==c d=\n e=3", add_special_tokens=False)]
    assert {")=", "=2", " =", "==", "=\n", "=3", "24", "48"} <= set(pieces)
    watched = _watched_tokens(bpe, {bpe.eos_token_id}, len(bpe))
    for piece in ("=", "=2", "=3", ")=", " =", "==", "=\n", "\n", EOS):
        assert watched[token(bpe, piece)], piece
    assert not watched[token(bpe, "24")] and not watched[token(bpe, ">>")]


@pytest.mark.parametrize(("written", "owed"), [
    ((" <<48/2", "[=]"), "24>>"),  # the `=` token alone: the whole result is owed
    ((" <<(3+4", "[)=]"), "7>>"),  # `)=`: the expression's last character and the `=` in one token
    ((" <<48/2", "[ =]"), "24>>"),  # ` =`: a space before the `=` (the expression is read without it)
    ((" <<48/2", "[=2]"), "4>>"),  # `=2` before 24: the token wrote the result's first digit; the rest is owed
    ((" <<10/5", "[=2]"), ">>"),  # `=2` before 2: the token wrote the whole result; only `>>` is owed
])
def test_a_merged_equals_sign_triggers_the_calculator(bpe, written, owed):
    written_ids, tail = ids_of(bpe, *written), ids_of(bpe, " ok")
    completion = decode_script(bpe, with_room(bpe, written_ids, owed, tail))
    assert completion.text == bpe.decode(written_ids) + owed + " ok"
    assert completion.forced_tokens == len(forced_ids(bpe, owed)) > 0
    assert bpe.decode(forced_ids(bpe, owed)) == owed


@pytest.mark.parametrize("merged", ["=3", "==", "=\n"])
def test_a_token_that_contradicts_the_result_makes_the_calculator_back_off(bpe, merged):
    """`=3` before 24, `==`, `=\n`: the model wrote something else after the `=`; nothing is forced."""
    script = ids_of(bpe, " <<48/2", f"[{merged}]", "5>> ok")
    completion = decode_script(bpe, script)
    assert completion.forced_tokens == 0
    assert completion.text == bpe.decode(script)
    assert calculator_completion(" <<48/2" + merged)[1] is None


def test_an_equals_sign_handled_once_is_not_forced_again(bpe):
    """After backing off at `=3`, the later digits of that annotation are the model's own; the next one is forced."""
    written = ids_of(bpe, " <<48/2", "[=3]", "[24]", ">> then <<2+2", "[=]")
    completion = decode_script(bpe, with_room(bpe, written, "4>>", ids_of(bpe, " ok")))
    assert completion.text == " <<48/2=324>> then <<2+2=4>> ok"
    assert completion.forced_tokens == len(forced_ids(bpe, "4>>"))


def test_forced_ids_decode_to_exactly_the_owed_text(bpe):
    for text in ("24>>", "4>>", ">>", "-3>>", "0.5>>", "1/3>>"):
        ids = forced_ids(bpe, text)
        assert bpe.decode(ids) == text
        assert bpe.decode(bpe.encode("48/2=", add_special_tokens=False) + ids) == "48/2=" + text
    assert forced_ids(bpe, "24>>") == bpe.encode("24>>", add_special_tokens=False)  # byte-level: as encoded


def test_forced_ids_do_not_start_a_word_on_a_sentencepiece_style_tokenizer():
    """Encoded alone, `24>>` becomes `▁24>>`: after `=` that would write `= 24>>`. forced_ids writes `=24>>`."""
    sp = merged_tokenizer(metaspace=True)
    equals = sp.encode("=", add_special_tokens=False)
    alone = sp.encode("24>>", add_special_tokens=False)
    assert sp.decode(equals + alone) == "= 24>>"  # the trap
    ids = forced_ids(sp, "24>>")
    assert sp.decode(equals + ids) == "=24>>"
    assert sp.decode(sp.encode("Q: <<48/2=", add_special_tokens=False) + ids) == "Q: <<48/2=24>>"


def test_the_vllm_replay_forces_after_a_merged_equals_sign(bpe):
    """vLLM stops a segment on any token holding `=`; the replay then forces only what is still owed."""
    first = ids_of(bpe, " <<48/2", "[=2]")
    rest = ids_of(bpe, " ok") + [bpe.eos_token_id]
    calls = []

    def engine(requests):
        calls.extend(requests)
        if len(calls) == 1:  # stopped on the token holding `=`, as vLLM's stop string does
            return [Segment(tuple(first), "stop", "=")]
        return [Segment(tuple(rest), "stop", None)]

    [completion] = vllm_backend.generate(engine, bpe, ["Q: x\n"], [0], DecodingConfig(max_new_tokens=40),
                                         show_progress=False)
    assert completion.text == " <<48/2=24>> ok"
    assert completion.forced_tokens == len(forced_ids(bpe, "4>>"))
    resumed_ids, _ = calls[1]
    assert resumed_ids[-len(forced_ids(bpe, "4>>")):] == forced_ids(bpe, "4>>")


# --- SmolLM2's real tokenizer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.padding_side = "left"
    return tokenizer


def test_smollm2_merges_equals_signs_and_every_such_token_is_watched(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("(3+4)=7 a =1 b==c", add_special_tokens=False)]
    assert {")=", " =", "=="} <= set(pieces)
    watched = _watched_tokens(tokenizer, {tokenizer.eos_token_id}, len(tokenizer))
    holding = [i for i in range(len(tokenizer)) if "=" in tokenizer.decode([i])]
    assert len(holding) > 50 and bool(watched[holding].all())
    assert watched[tokenizer.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize(("written", "expected"), [
    ("She has <<48/2=", "She has <<48/2=24>>"),
    ("So (3+4)=<<(3+4)=", "So (3+4)=<<(3+4)=7>>"),  # `)=` is one SmolLM2 token
    ("Then <<48/2 =", "Then <<48/2 =24>>"),  # ` =` is one SmolLM2 token
    ("Half: $<<9*2=", "Half: $<<9*2=18>>"),
    ("Left: <<3-5=", "Left: <<3-5=-2>>"),
])
def test_smollm2_rows_are_completed_by_the_calculator(smollm2_tokenizer, written, expected):
    tokenizer = smollm2_tokenizer
    owed = expected[len(written):]
    script = with_room(tokenizer, tokenizer.encode(written, add_special_tokens=False), owed,
                       tokenizer.encode(" ok", add_special_tokens=False))
    completion = decode_script(tokenizer, script, prompt="<|im_start|>assistant\n", max_new_tokens=30)
    assert completion.text == expected + " ok"
    assert completion.forced_tokens == len(forced_ids(tokenizer, owed))
    assert tokenizer.decode(forced_ids(tokenizer, owed)) == owed


def test_smollm2_backs_off_when_its_token_contradicts_the_result(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    ids = tokenizer.encode("x <<48/2==", add_special_tokens=False)
    assert tokenizer.decode(ids[-1:]) == "=="
    completion = decode_script(tokenizer, ids + tokenizer.encode(" ok", add_special_tokens=False),
                               prompt="<|im_start|>assistant\n")
    assert completion.forced_tokens == 0 and completion.text == "x <<48/2== ok"
