"""lowbit's exception types.

Every user-facing error is a :class:`LowbitError` whose message says what is wrong *and how to fix it*, in one
line. The CLI prints that line and exits non-zero; it never prints a traceback for these.
"""

from __future__ import annotations


class LowbitError(Exception):
    """Base class: a problem the user can fix. The message names the fix."""


class ConfigError(LowbitError):
    """An invalid quantization setting (bits, group size, method, layer patterns)."""


class ModelLoadError(LowbitError):
    """A model could not be found, read or understood (missing/corrupt files, unknown architecture)."""


class TextError(LowbitError):
    """Evaluation or calibration text is missing, empty or too short."""


class OutputExistsError(LowbitError):
    """The output path exists and ``--overwrite`` was not given."""


class FormatError(LowbitError):
    """A file is not in a layout lowbit can read or write."""
