"""Output formats and the readers of quantized files; importing the package registers the readers with
:mod:`lowbit.model.loading` (``load_model``: lowbit, compressed-tensors and GPTQ folders; ``open_model``, streamed:
lowbit, compressed-tensors and GPTQ folders and GGUF files)."""

from lowbit.formats import compressed_tensors as _compressed_tensors  # noqa: F401  (registers "compressed-tensors")
from lowbit.formats import gptq_format as _gptq_format  # noqa: F401  (registers "gptq")
from lowbit.formats import native as _native  # noqa: F401  (registers "lowbit")
from lowbit.formats import serving_source as _serving_source  # noqa: F401  (streams "compressed-tensors", "gptq")
from lowbit.formats.gguf import source as _gguf_source  # noqa: F401  (registers "gguf")
