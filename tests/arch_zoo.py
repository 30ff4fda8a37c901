"""Tiny random models of every architecture lowbit exports to GGUF, with a real (tiny, trained) BPE tokenizer.

Shared by ``tests/formats/test_gguf_architectures.py`` and ``bench/gguf_architectures.py``. Each model is a few
hundred KB: 2 blocks, width 64, vocabulary 512 — the tokenizer is trained on lowbit's built-in text to exactly that
size, so llama.cpp accepts the file (it checks the token list against the vocabulary). Norm weights are perturbed
so a writer that drops a ``1 + w`` offset or a norm entirely changes the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import transformers as tf

VOCAB = 512
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": lambda: tf.LlamaConfig(**_SMALL),
    "mistral": lambda: tf.MistralConfig(**_SMALL),
    "qwen2": lambda: tf.Qwen2Config(**_SMALL),
    "qwen3": lambda: tf.Qwen3Config(**_SMALL, head_dim=16),
    "phi3": lambda: tf.Phi3Config(**_SMALL, pad_token_id=0),
    "gemma2": lambda: tf.Gemma2Config(**_SMALL, head_dim=16, query_pre_attn_scalar=16),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**_SMALL, head_dim=16, query_pre_attn_scalar=16),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "starcoder2": lambda: tf.Starcoder2Config(**_SMALL),
    "stablelm": lambda: tf.StableLmConfig(**_SMALL),
    "falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      new_decoder_architecture=False, multi_query=True),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**_SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=64),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**_SMALL, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, norm_topk_prob=True),
    # rotary scaling as real checkpoints use it (Llama 3.1's llama3, Qwen2.5's YaRN, Gemma 3's linear + local θ,
    # Phi-3-128k's LongRoPE), at sizes where it changes the logits of a 12-token prompt
    "llama+llama3-rope": lambda: tf.LlamaConfig(**{**_SMALL, "max_position_embeddings": 16384}, head_dim=64,
                                                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0,
                                                                     factor=8.0, low_freq_factor=1.0,
                                                                     high_freq_factor=4.0,
                                                                     original_max_position_embeddings=8192)),
    "qwen2+yarn": lambda: tf.Qwen2Config(**_SMALL, rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                                                         original_max_position_embeddings=64)),
    "gemma3_text+linear-rope": lambda: tf.Gemma3TextConfig(
        **{**_SMALL, "num_hidden_layers": 6}, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
    "phi3+longrope": lambda: tf.Phi3Config(**_SMALL, pad_token_id=0, rope_parameters=dict(
        rope_type="longrope", rope_theta=1e4, original_max_position_embeddings=64,
        long_factor=[1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0], short_factor=[1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0])),
}
PROMPT = [1, 5, 9, 17, 33, 65, 129, 257, 300, 7, 44, 480]


def tiny_tokenizer(vocab: int = VOCAB) -> Any:
    """A byte-level BPE tokenizer of exactly ``vocab`` tokens, trained on lowbit's built-in text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lowbit.data.text import default_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([default_text("eval")[:200_000]], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")


def build(arch: str, folder: Path, tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    """Save a tiny random ``arch`` model with ``tokenizer`` as a Hugging Face folder; returns the model (float32)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def llama_cpp_logits(path: Path, tokens: list[int]) -> Any:
    """llama.cpp's logits (numpy ``[len(tokens), vocab]``) for ``tokens`` from the GGUF file at ``path``."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()
