"""Models: a tiny Llama trained from scratch for the embedded default, or any HF causal LM.

The tiny path trains a byte-level BPE tokenizer on the task's own text (digits
split one per token, so the calculator's forced results tokenize exactly as the
model would write them) and initialises a Llama-architecture model of a few
million parameters. It is saved in Hugging Face format with a chat template, so
everything downstream takes the same code path as a real pretrained model
given by Hub id or local path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TINY = "tiny"  # the `base_model` value that means "build one from scratch"
PAD, EOS = "<pad>", "</s>"

# Renders a user turn as "Question: ...\nAnswer:\n" and an assistant turn as its
# text plus EOS: the format the tiny model is trained and prompted with.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\\nAnswer:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


@dataclass(frozen=True, kw_only=True)
class TinyModelConfig:
    """Size of the from-scratch Llama; read from params.yaml `model`."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_length: int = 512
    seed: int = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Byte-level BPE over `texts`, with one token per digit and left padding for batched generation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, padding_side="left"
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    return wrapped


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, config: TinyModelConfig) -> PreTrainedModel:
    """A freshly initialised Llama sized by `config`, deterministic in `config.seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(llama)


def is_gguf(name_or_path: str | Path) -> bool:
    """A GGUF checkpoint file (llama.cpp's format), as opposed to a model folder or a Hub id."""
    return str(name_or_path).lower().endswith(".gguf")


def looks_local(name_or_path: str | Path) -> bool:
    """Whether a model name is meant as a path on this machine rather than a Hub id ("org/name").

    It exists; starts with `.`, `/` or `~`; has a backslash, more than one `/` or a trailing one (a Hub id
    has exactly one, inside); or its first part is a folder here (`models/iter_9` beside `models/`).
    """
    text = str(name_or_path)
    if Path(text).exists() or text.startswith((".", "/", "~")) or "\\" in text or text.endswith("/"):
        return True
    return text.count("/") > 1 or ("/" in text and Path(text.split("/", 1)[0]).is_dir())


def check_model_location(name_or_path: str | Path, *, needs: str = "config.json") -> None:
    """A one-line error, before any loading, for a model that cannot be there.

    A local path must be a folder holding `needs` (config.json; a command that reads only the tokenizer asks
    for tokenizer_config.json); a Hub id is left to the Hub loader, except that with HF_HUB_OFFLINE set it must
    already be in the local Hugging Face cache.
    """
    import os

    text = str(name_or_path)
    path = Path(text).expanduser()
    if looks_local(text):
        if not path.exists():
            raise FileNotFoundError(f"no such model folder: {text}")
        if not path.is_dir():
            raise ValueError(f"{text}: not a model folder (a file; a GGUF model file must end in .gguf)")
        if not (path / needs).is_file():
            raise ValueError(f"{text}: not a model folder (no {needs} in it)")
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(text, needs), str):
            raise FileNotFoundError(
                f"model {text!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")


def load_model(name_or_path: str | Path, *, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched decoding.

    `name_or_path` is a local model folder, a Hub id, or a GGUF file: transformers
    dequantizes GGUF weights but refuses to save such a model, so it is rebuilt as the
    plain model class of its architecture, which saves as an ordinary HF folder.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokenizer = load_tokenizer(name_or_path)
    if is_gguf(name_or_path):
        path = Path(name_or_path)
        model = _plain_model(AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    model = model.to(device)
    model.eval()
    return model, tokenizer


def check_model(name_or_path: str | Path) -> None:
    """`load_model`'s one-line error for a model that cannot be there, without loading it (for a stage whose
    workers load the model: the error comes before any work starts)."""
    if is_gguf(name_or_path):
        if not Path(name_or_path).is_file():
            raise FileNotFoundError(f"GGUF model file not found: {name_or_path}")
    else:
        check_model_location(name_or_path)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model` gives, without the weights (left padding, a pad token)."""
    from transformers import AutoTokenizer

    check_model(name_or_path)
    if is_gguf(name_or_path):
        path = Path(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _plain_model(loaded: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a fresh model of the same class, free of the GGUF loader's quantizer marks."""
    import torch

    config = loaded.config
    for attribute in ("quantization_config", "gguf_file"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    buffers = dict(loaded.named_buffers())  # not in the state dict (rotary frequencies): taken as they are
    for name, buffer in list(plain.named_buffers()):
        module_name, _, buffer_name = name.rpartition(".")
        plain.get_submodule(module_name).register_buffer(buffer_name, buffers[name], persistent=False)
    plain.tie_weights()
    return plain


def format_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The text a model is prompted with for `question`: its chat template's user turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {question}\nAnswer:\n"


_TURN_MARKER = "FACTORYENDOFTURNMARKER"  # no spaces or newlines, so templates that trim content keep it whole


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text that ends an assistant turn: what the chat template writes right after the message's content.

    Whitespace around it is left out (the newline ChatML writes after `<|im_end|>` opens the next turn; the
    model stops at the end-of-turn token and never writes it). Without a chat template, or when the template
    writes nothing after the content, it is the tokenizer's EOS. The tiny model's template ends a turn with
    EOS, so its training text is what TRL's own appended EOS made; SmolLM2's (ChatML) ends it with
    `<|im_end|>`, Llama-3's with `<|eot_id|>`, Qwen's with `<|im_end|>` where its EOS may be `<|endoftext|>`.
    """
    eos = tokenizer.eos_token or ""
    if not getattr(tokenizer, "chat_template", None):
        return eos
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": _TURN_MARKER}], tokenize=False)
    except Exception:  # a template that refuses this conversation: EOS, as TRL would append
        return eos
    at = rendered.rfind(_TURN_MARKER)
    tail = rendered[at + len(_TURN_MARKER):].strip() if at >= 0 else ""
    return tail or eos


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token id that ends an assistant turn, when the end of turn is one token (decoding stops on it)."""
    text = end_of_turn(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False) if text else []
    return ids[0] if len(ids) == 1 else None


def format_completion(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """A finished assistant answer as a training completion: `text` closed with the model's end of turn, once."""
    end = end_of_turn(tokenizer)
    return text if not end or text.endswith(end) else text + end


def trainer_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer to hand TRL's trainers: one whose EOS is the end of turn.

    TRL appends `eos_token` to a plain-text completion unless it already ends with it (SFT, DPO) and
    `eos_token_id` to its ids (ORPO). Completions here end with `end_of_turn` (`format_completion`), so
    when that is the EOS (the tiny model, SmolLM2) the tokenizer goes as it is and TRL adds nothing; when
    it differs (Qwen's `<|im_end|>` beside EOS `<|endoftext|>`), a copy whose EOS is the end of turn keeps
    TRL from adding a second end token. The model folder keeps the tokenizer as it was.
    """
    import copy

    end = end_of_turn(tokenizer)
    if not end or end == tokenizer.eos_token or end_of_turn_id(tokenizer) is None:
        return tokenizer
    trainer_copy = copy.deepcopy(tokenizer)
    trainer_copy.eos_token = end
    return trainer_copy


def count_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())
