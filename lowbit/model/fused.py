"""Checkpoints whose stored tensors are not the model's parameters one to one: fused mixture-of-experts weights.

A mixture-of-experts checkpoint (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE…) stores one tensor per expert::

    model.layers.3.mlp.experts.0.gate_proj.weight   [I, H]
    model.layers.3.mlp.experts.0.up_proj.weight     [I, H]      … for experts 0 … E-1

while transformers 5 builds one 3-D parameter per block and role::

    model.layers.3.mlp.experts.gate_up_proj         [E, 2I, H]  = cat(stack(gate_e), stack(up_e), dim=1)
    model.layers.3.mlp.experts.down_proj            [E, H, I]   = stack(down_e)

transformers knows these conversions as data (``transformers.conversion_mapping``: source patterns with a ``*`` for
the expert number, target pattern, and the operations ``MergeModulelist`` / ``Concatenate``) and applies them while
``from_pretrained`` loads the whole model. :class:`FusingSource` applies the same conversion objects to one target
tensor at a time, so a streamed job reads a block's experts when it reaches the block and never holds more.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch

from lowbit.errors import ModelLoadError


class FusingSource:
    """A :class:`~lowbit.model.source.WeightSource` that serves fused parameters built from per-expert tensors.

    ``inner``: the stored tensors (by stored name); ``model_type``: whose conversion mapping applies; ``slots``: the
    model's state-dict names (a conversion applies only where its target is a parameter of the model).
    Names the conversions do not touch pass through unchanged.
    """

    def __init__(self, inner: Any, model_type: str, slots: frozenset[str]) -> None:
        self.inner = inner
        self._renames: dict[str, str] = {}  # model name → stored name, where they differ
        self._fused: dict[str, tuple[Any, dict[str, list[str]]]] = {}  # target → (converter, pattern → names)
        converters = _conversions(model_type)
        consumed: set[str] = set()
        by_model_name: dict[str, str] = {}
        for stored in inner.names:
            name = stored
            for pattern, replacement in converters["renames"]:
                name = re.sub(pattern, replacement, name)
            by_model_name[name] = stored
            if name != stored:
                self._renames[name] = stored
        for converter in converters["fusions"]:
            groups: dict[str, dict[str, dict[int, str]]] = {}
            for name, stored in by_model_name.items():
                for pattern in converter.source_patterns:
                    match = _pattern_regex(pattern).search(name)
                    if match is None:
                        continue
                    target = name[:match.start()] + converter.target_patterns[0]
                    if target in slots:
                        groups.setdefault(target, {}).setdefault(pattern, {})[int(match.group(1))] = stored
            for target, per_pattern in groups.items():
                self._fused[target] = (converter, _ordered(target, converter.source_patterns, per_pattern))
                consumed.update(n for names in self._fused[target][1].values() for n in names)
        self.names = frozenset(n for n, stored in by_model_name.items() if stored not in consumed) | frozenset(
            self._fused)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self._fused:
            converter, per_pattern = self._fused[name]
            parts = {pattern: [self.inner.read(n) for n in names] for pattern, names in per_pattern.items()}
            fused = _apply(converter, parts)
            return fused if dtype is None else fused.to(dtype)
        return self.inner.read(self._renames.get(name, name), dtype)

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self._fused:
            return self.read(name, dtype)[start:stop]
        return self.inner.read_rows(self._renames.get(name, name), start, stop, dtype)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Stored shapes, with each fused parameter's shape computed by the same operations on meta tensors."""
        stored = self.inner.shapes()
        result = {name: stored[self._renames.get(name, name)] for name in self.names if name not in self._fused}
        for target, (converter, per_pattern) in self._fused.items():
            parts = {p: [torch.empty(stored[n], device="meta") for n in names] for p, names in per_pattern.items()}
            result[target] = tuple(_apply(converter, parts).shape)
        return result

    def close(self) -> None:
        self.inner.close()


def needs_fusing(model_type: str, stored: frozenset[str]) -> bool:
    """Whether ``stored`` names hold per-expert (or renamed) tensors that ``model_type``'s conversion mapping
    turns into other parameters. A stored name that only a conversion lowbit cannot apply would turn into a
    parameter (a split, a transpose, a model-specific operation) is refused here, naming the fix."""
    converters = _conversions(model_type)
    for converter in converters["other"]:
        patterns = [re.compile(re.escape(p).replace(r"\*", r"\d+")) for p in converter.source_patterns]  # anywhere
        if any(p.search(name) for name in stored for p in patterns):
            raise ModelLoadError(f"model type {model_type!r} stores tensors that transformers converts with "
                                 f"{[type(op).__name__ for op in converter.operations]} while loading; lowbit "
                                 "applies only the per-expert stacking of mixture-of-experts models: convert the "
                                 "checkpoint with transformers (from_pretrained + save_pretrained) or use another "
                                 "model")
    patterns = [_pattern_regex(p) for c in converters["fusions"] for p in c.source_patterns]
    renames = [re.compile(p) for p, _ in converters["renames"]]
    return any(p.search(name) for name in stored for p in patterns + renames)


@functools.lru_cache(maxsize=None)
def _conversions(model_type: str) -> dict[str, list[Any]]:
    """transformers' checkpoint conversions for ``model_type``: renames as ``(regex, replacement)``, the fusing
    converters (``WeightConverter`` with operations lowbit can apply one target at a time) and the ``other`` ones.
    Built once per model type (transformers builds the mapping anew on each call: ~2 ms, and the GGUF writer asks
    for every tensor); callers never modify it."""
    from transformers.conversion_mapping import (Concatenate, MergeModulelist, WeightConverter, WeightRenaming,
                                                 get_checkpoint_conversion_mapping)

    renames, fusions, other = [], [], []
    for conversion in get_checkpoint_conversion_mapping(model_type) or ():
        if isinstance(conversion, WeightConverter):
            ops = list(conversion.operations)
            supported = ops and all(isinstance(op, (MergeModulelist, Concatenate)) for op in ops) and len(
                conversion.target_patterns) == 1
            (fusions if supported else other).append(conversion)
        elif isinstance(conversion, WeightRenaming):
            renames.extend(zip(conversion.source_patterns, conversion.target_patterns))
    return {"renames": renames, "fusions": fusions, "other": other}


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """``mlp.experts.*.gate_proj.weight`` → a regex matching it at the end of a name, the ``*`` captured."""
    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


def _ordered(target: str, patterns: list[str], found: dict[str, dict[int, str]]) -> dict[str, list[str]]:
    """Each source pattern's stored names in expert order; every pattern present, experts numbered 0 … E-1."""
    counts = {len(found.get(p, {})) for p in patterns}
    for pattern in patterns:
        indices = sorted(found.get(pattern, {}))
        if indices != list(range(len(indices))) or len(counts) != 1 or not indices:
            raise ModelLoadError(f"{target}: the checkpoint's per-expert tensors are incomplete (pattern {pattern!r} "
                                 f"has experts {indices[:8]}{'…' if len(indices) > 8 else ''}); re-download it")
    return {p: [found[p][i] for i in range(len(found[p]))] for p in patterns}


def _apply(converter: Any, parts: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """transformers' own operations of ``converter`` on one target's tensors (``parts``: pattern → per-expert)."""
    data: dict[str, Any] = dict(parts)
    for op in converter.operations:
        data = op.convert(data, source_patterns=list(converter.source_patterns),
                          target_patterns=list(converter.target_patterns))
    (result,) = data.values()
    return result


def unfuse(model_type: str, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The inverse of a fusing conversion, for writers whose format stores the parts (GGUF: ``ffn_gate_exps`` and
    ``ffn_up_exps``): ``(name, tensor)`` of a fused parameter becomes one ``(stacked name, part)`` per source pattern
    (``model.layers.3.mlp.experts.gate_up_proj [E, 2I, H]`` → ``….experts.gate_proj.weight [E, I, H]`` and
    ``….experts.up_proj.weight``), split where the conversion concatenated; any other name passes through."""
    from transformers.conversion_mapping import Concatenate

    for converter in _conversions(model_type)["fusions"]:
        target = converter.target_patterns[0]
        if not name.endswith(target):
            continue
        prefix = name[: len(name) - len(target)]
        names = [prefix + p.replace(".*", "") for p in converter.source_patterns]
        concat = [op for op in converter.operations if isinstance(op, Concatenate)]
        parts = tensor.chunk(len(names), dim=concat[0].dim) if concat and len(names) > 1 else (tensor,)
        return list(zip(names, parts))
    return [(name, tensor)]
