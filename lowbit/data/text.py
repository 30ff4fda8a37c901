"""Text sources for evaluation and calibration.

The user's own text (``--text FILE``, ``--calib FILE``) is always preferred: quality loss depends on what the model
will read. When none is given, lowbit uses a **built-in default** that every fresh install has without any download:
the English documentation (docstrings) of a fixed list of Python standard-library modules, read with
their own ``__doc__`` strings (each once). It is technical prose mixed with code examples — not WikiText, so its perplexities are not
comparable with paper tables, but it is identical on every install of the same Python version, and the evaluation
and calibration module lists are disjoint so calibration never sees the evaluation text.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import warnings
from pathlib import Path

from lowbit.errors import TextError

log = logging.getLogger(__name__)

EVAL_MODULES = (
    "argparse", "collections", "json", "logging", "subprocess", "threading", "datetime", "decimal",
    "fractions", "statistics", "textwrap", "difflib", "pathlib", "shutil", "tarfile", "zipfile", "csv",
    "heapq", "bisect", "functools", "itertools", "string", "re", "enum", "dataclasses",
)
CALIB_MODULES = (
    "asyncio", "email.message", "http.client", "urllib.parse", "unittest", "doctest", "configparser",
    "socket", "ssl", "sqlite3", "xml.etree.ElementTree", "random", "typing", "contextlib", "abc",
    "pickle", "copy", "pprint", "tempfile", "glob", "fnmatch", "optparse", "gettext", "locale", "calendar",
)


def _own_doc(obj: object) -> str:
    """The object's own docstring (not one inherited from a base class), cleaned of indentation."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _docs_of(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    docs = [_own_doc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        docs.append(_own_doc(obj))
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    docs.append(_own_doc(member))
    return [d for d in docs if len(d) > 40]


def default_text(split: str = "eval") -> str:
    """The built-in text: ``split`` is ``eval`` or ``calib`` (disjoint module lists)."""
    modules = {"eval": EVAL_MODULES, "calib": CALIB_MODULES}.get(split)
    if modules is None:
        raise TextError(f"unknown default text split {split!r}: use 'eval' or 'calib'")
    with warnings.catch_warnings():  # reading typing's deprecated aliases warns; we only read their docstrings
        warnings.simplefilter("ignore", DeprecationWarning)
        docs = [doc for name in modules for doc in _docs_of(name)]
    return "\n\n".join(dict.fromkeys(docs))  # each docstring once, in first-seen order


def read_text(path: str | Path | None, split: str = "eval") -> tuple[str, str]:
    """``(text, description)``: the user's file if given, else the built-in default for ``split``."""
    if path is None:
        return default_text(split), f"built-in default ({split}: Python stdlib docstrings)"
    file = Path(path).expanduser()
    if not file.is_file():
        raise TextError(f"text file {file} not found: give an existing UTF-8 text file, or omit it for the default")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(f"{file} is not UTF-8 text ({exc}): convert it, e.g. `iconv -t utf-8`") from exc
    if not text.strip():
        raise TextError(f"{file} is empty: give a file with text in it")
    return text, str(file)
