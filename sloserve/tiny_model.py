"""Builds a small random-weight Llama model and its tokenizer, for tests and local runs.

There is no model hub here, so the project makes its own model: real Llama architecture,
real byte-level BPE tokenizer, random weights. vLLM loads it like any Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Text the tokenizer learns its merges from. Any text will tokenize (byte-level BPE falls back
# to single bytes); this only makes common English words cost fewer tokens.
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. "
    "hello world, this is a small model for serving tests. "
    "please write a function that returns the sum of two numbers. "
    "summarize the following document in three sentences. "
    "think step by step and then answer the question. "
    "call the weather tool for the city and report the temperature. "
    "once upon a time there was a request that met its deadline. "
)

# The thinking markers of reasoning models (vLLM's `deepseek_r1` reasoning parser looks for
# them), so a replica of a generated model can be run with a reasoning parser in tests.
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>", "<think>", "</think>")


@dataclass(frozen=True)
class ModelShape:
    """The architecture knobs of a generated Llama model."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2  # head_dim 64: vLLM's CPU attention rejects 16
    intermediate_size: int = 256
    vocab_size: int = 1024
    max_position_embeddings: int = 1024


TINY = ModelShape()
# The benchmark model: big enough that a step's time grows with its tokens on a CPU (a
# 512-token prefill chunk costs several idle decode steps), as on a GPU, so scheduling matters.
BENCH = ModelShape(
    hidden_size=384,
    num_layers=6,
    num_heads=6,
    intermediate_size=1024,
    vocab_size=2048,
    max_position_embeddings=4096,
)
SHAPES = {"tiny": TINY, "bench": BENCH}


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def build_model(out_dir: Path, shape: ModelShape = TINY, seed: int = 0) -> Path:
    """Writes a random-weight Llama checkpoint and tokenizer to out_dir; returns out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.vocab_size)
    vocab_size = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "sloserve-model.json").write_text(
        json.dumps({"generator": "sloserve tiny_model", "seed": seed, **shape.__dict__}, indent=2)
    )
    return out_dir


def ensure_model(out_dir: Path, shape: ModelShape = TINY) -> Path:
    """out_dir, with a model built there first if it holds none.

    The model is built in a sibling folder and renamed into place, so a process killed
    half-way (a restarted pod) leaves no half-written model that would later look complete.
    """
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        build_model(partial, shape)
        if out_dir.exists():
            out_dir.rmdir()  # an empty folder: anything else was caught above or is an error
        partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir
