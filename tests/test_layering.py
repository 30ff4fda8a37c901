"""The package's layers import one way only (every import, including those inside functions).

``core`` (grids, packing, rounding) ← ``nn``/``calib`` ← ``model`` (float models and sources) ← ``formats``
(files: readers register into ``model``'s opener registry, writers take finished tensors) ← ``methods`` (q-params,
rounding, transforms) ← ``pipeline``/``quantize``/jobs ← ``eval``/``plan`` ← ``cli``. A format that needed the
pipeline, or a model loader that needed a format, would tie layers that must change independently.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowbit"
JOBS = ("lowbit.pipeline", "lowbit.quantize", "lowbit.job", "lowbit.gguf_job", "lowbit.report")
UI = ("lowbit.cli", "lowbit.cli_mixed", "lowbit.gguf_mix")  # gguf_mix: plans (plan) for a job (gguf_job)
FORBIDDEN = {
    "lowbit.core": ("lowbit.nn", "lowbit.calib", "lowbit.model", "lowbit.formats", "lowbit.methods", "lowbit.eval",
                    "lowbit.plan", *JOBS, *UI),
    "lowbit.model": ("lowbit.formats", "lowbit.methods", "lowbit.eval", "lowbit.plan", *JOBS, *UI),
    "lowbit.formats": ("lowbit.methods", "lowbit.eval", "lowbit.plan", *JOBS, *UI),
    "lowbit.methods": ("lowbit.eval", "lowbit.plan", *JOBS, *UI),
    "lowbit.calib": ("lowbit.formats", "lowbit.methods", "lowbit.eval", "lowbit.plan", *JOBS, *UI),
    "lowbit.nn": ("lowbit.formats", "lowbit.methods", "lowbit.eval", "lowbit.plan", *JOBS, *UI),
    "lowbit.pipeline": ("lowbit.formats", "lowbit.eval", "lowbit.plan", *UI),
    "lowbit.eval": UI,
    "lowbit.plan": UI,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    return _imports_in(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_in(text: str, module: str, is_package: bool) -> set[str]:
    """Every ``lowbit`` module ``text`` imports (module level or inside functions; relative ones resolved)."""
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                parts = module.split(".") + ([""] if is_package else [])
                base = [p for p in parts[: -node.level] if p]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "lowbit" or n.startswith("lowbit.")}


def _layer(module: str) -> str | None:
    matches = [layer for layer in FORBIDDEN if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def _inside(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_checker_finds_imports_inside_functions_and_relative_ones() -> None:
    text = "import os\nfrom lowbit.core import qparams\ndef f():\n    from lowbit.pipeline import x\n" \
           "    from ..methods import gptq\n"
    found = _imports_in(text, "lowbit.formats.native", False)
    assert {"lowbit.core", "lowbit.pipeline", "lowbit.methods", "lowbit.methods.gptq"} <= found
    assert _layer("lowbit.formats.gguf.sink") == "lowbit.formats" and _layer("lowbit.job") is None
    assert sorted(n for n in found if _inside(n, FORBIDDEN["lowbit.formats"]))[:2] == ["lowbit.methods",
                                                                                      "lowbit.methods.gptq"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    module = _module_name(path)
    layer = _layer(module)
    if layer is None:
        return
    bad = sorted(n for n in _imports(path) if _inside(n, FORBIDDEN[layer]))
    assert not bad, f"{module} ({layer} layer) imports {bad}"
