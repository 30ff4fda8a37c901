"""Output formats and the readers of quantized files; importing the package registers the streaming readers
(lowbit folders, GGUF files) with :func:`lowbit.model.loading.open_model`."""

from lowbit.formats import native as _native  # noqa: F401  (registers "lowbit")
from lowbit.formats.gguf import source as _gguf_source  # noqa: F401  (registers "gguf")
