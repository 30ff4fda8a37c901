"""lowbit: make large language models small, and measure what it costs.

Quick start::

    from lowbit import load_model, quantize_model, QuantConfig, QuantRecipe, save_quantized
    lm = load_model("smollm2-135m")
    quantize_model(lm.model, QuantRecipe(QuantConfig(bits=4, group_size=128)))
    save_quantized(lm, "smollm2-q4")
"""

from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import LowbitError
from lowbit.formats.native import load_quantized, save_quantized
from lowbit.model.loading import load_model
from lowbit.quantize import quantize_model

__all__ = ["QuantConfig", "QuantRecipe", "LowbitError", "load_model", "load_quantized", "quantize_model",
           "save_quantized"]
__version__ = "0.1.0"
