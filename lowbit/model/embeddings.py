"""Quantizing a model's token embedding (``QuantRecipe.embeddings``): which table, with which config, tied or not.

One step for the in-memory verb and the streamed job alike: :func:`embedding_target` checks the model and the recipe
up front (on a meta skeleton too, before any block is quantized), :func:`quantize_embedding` reads the float table a
chunk of rows at a time (never whole: a 128k × 4096 vocabulary is 2 GB in float32), quantizes each chunk row-wise
(:func:`lowbit.nn.qembedding.quantize_rows`, bit-identical to quantizing it whole) and swaps in a
:class:`~lowbit.nn.qembedding.QEmbedding` — the packed table, ``b/16`` of its float16 bytes plus scales, is what
stays in memory.

Tied embeddings (``tie_word_embeddings``: the output head's weight *is* the table, as in SmolLM2, Gemma, GPT-2):
the head becomes a :class:`~lowbit.nn.qlinear.QLinear` over the very same ``qweight``/``scales`` tensors, so the
logits are computed with the embedding's decoded weights and a checkpoint stores the matrix once (the head's
fields are aliases, :meth:`EmbeddingTarget.aliases`). An untied head is left to the recipe's ``include``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import ConfigError, ModelLoadError
from lowbit.model.modules import set_submodule
from lowbit.model.source import StreamingModel
from lowbit.nn.qembedding import QEmbedding, concat_rows, embedding_config, quantize_rows
from lowbit.nn.qlinear import QLinear

log = logging.getLogger(__name__)
TABLE_ROWS = 8192  # float rows read and quantized at a time


@dataclass(frozen=True)
class EmbeddingTarget:
    """The token embedding to quantize: module ``name`` with table ``shape`` ``(V, H)``, the ``config`` it gets
    (group size fitted to ``H``), the constant its lookup is multiplied by (``embed_scale``, Gemma) and the
    ``head`` module that shares its table (None when untied)."""

    name: str
    shape: tuple[int, int]
    config: QuantConfig
    embed_scale: float | None
    head: str | None

    def aliases(self, float_aliases: dict[str, str]) -> dict[str, str]:
        """Checkpoint aliases (``{name: stored name}``) once the table is quantized: a tied head's fields name
        the embedding's (``lm_head.qweight`` → ``model.embed_tokens.qweight`` …) instead of its float weight."""
        out = {k: v for k, v in float_aliases.items() if k != f"{self.head}.weight"}
        if self.head is not None:
            fields = ("qweight", "scales") + (() if self.config.symmetric else ("zeros",))
            out.update({f"{self.head}.{leaf}": f"{self.name}.{leaf}" for leaf in fields})
        return dict(sorted(out.items()))

    def module_names(self) -> tuple[str, ...]:
        """The modules the step replaces: the embedding, and the tied head."""
        return (self.name,) if self.head is None else (self.name, self.head)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _embed_scale(table: nn.Module) -> float | None:
    """The constant a supported embedding module multiplies its rows by (None: a plain ``nn.Embedding``)."""
    if type(table) is nn.Embedding:
        scale = None
    elif type(table).__name__.endswith("ScaledWordEmbedding") and torch.is_tensor(getattr(table, "embed_scale", None)):
        scale = float(table.embed_scale)  # Gemma & co: ``embedding(ids) · embed_scale``
    else:
        raise ConfigError(f"the token embedding is a {type(table).__name__}, which lowbit cannot quantize (it "
                          "knows nn.Embedding and the scaled word embeddings): drop --embeddings")
    if table.max_norm is not None:
        raise ConfigError("the token embedding renormalizes rows (max_norm): lowbit cannot quantize it; drop "
                          "--embeddings")
    return scale


def embedding_target(model: nn.Module, recipe: QuantRecipe) -> EmbeddingTarget | None:
    """What :func:`quantize_embedding` will do to ``model`` (in memory or a meta skeleton) under ``recipe``; None
    when ``recipe.embeddings`` is None. Raises :class:`ConfigError` for what cannot be done, before any work."""
    if recipe.embeddings is None:
        return None
    table = model.get_input_embeddings()
    if isinstance(table, QEmbedding):
        raise ConfigError("this model's token embedding is already quantized: quantize the float original instead")
    if table is None or not isinstance(table, nn.Embedding):
        raise ConfigError("this model has no token-embedding table lowbit can quantize: drop --embeddings")
    scale = _embed_scale(table)
    name = _name_of(model, table)
    vocab, hidden = table.weight.shape
    head = model.get_output_embeddings()
    text_config = getattr(model.config, "get_text_config", lambda: model.config)()
    tied = head is not None and (getattr(head, "weight", None) is table.weight
                                 or bool(getattr(text_config, "tie_word_embeddings", False)))
    head_name = None
    if tied:
        head_name = _name_of(model, head)
        if not isinstance(head, nn.Linear) or tuple(head.weight.shape) != (vocab, hidden):
            raise ConfigError(f"the output head {head_name} is tied to the embedding but is not a [{vocab}, {hidden}] "
                              "linear layer: drop --embeddings")
        if recipe.selects(head_name, False):
            raise ConfigError(f"{head_name} is tied to the token embedding, so --embeddings quantizes it too (with the "
                              f"embedding's codes, stored once): drop --include {head_name}")
    return EmbeddingTarget(name, (vocab, hidden), embedding_config(recipe.embeddings, hidden), scale, head_name)


@torch.no_grad()
def quantize_embedding(model: nn.Module | StreamingModel, target: EmbeddingTarget) -> QEmbedding:
    """Quantize the table of ``target`` (read :data:`TABLE_ROWS` rows at a time) and swap the modules in place:
    the embedding for a :class:`QEmbedding`, a tied head for a :class:`QLinear` sharing its tensors."""
    sm = model if isinstance(model, StreamingModel) else StreamingModel(model, None, None, "memory", "memory")
    vocab, hidden = target.shape
    weight_name = f"{target.name}.weight"
    parts = []
    for start in range(0, vocab, TABLE_ROWS):
        rows = sm.read_rows(weight_name, start, min(vocab, start + TABLE_ROWS), torch.float32)
        bad = int((~torch.isfinite(rows)).sum())
        if bad:
            raise ModelLoadError(f"{weight_name} has {bad} non-finite values (NaN/Inf): the checkpoint is damaged; "
                                 "re-download it, or drop --embeddings")
        parts.append(quantize_rows(rows, target.config))
    qt = concat_rows(parts)
    embedding = QEmbedding(qt, target.embed_scale)
    if target.head is not None:
        head = sm.model.get_submodule(target.head)
        bias = None
        if head.bias is not None:
            bias = head.bias.detach() if not head.bias.is_meta else sm.read(f"{target.head}.bias", torch.float32)
        set_submodule(sm.model, target.head, QLinear(qt, bias))  # the same qweight/scales tensors
    set_submodule(sm.model, target.name, embedding)
    log.info("token embedding %s [%d × %d]: %s (%.2f bits per weight)%s", target.name, vocab, hidden,
             target.config.describe(), qt.bits_per_weight, f", shared with the tied {target.head}" if target.head
             else "")
    return embedding
