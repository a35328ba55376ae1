"""The decoder-only transformer (Llama-style) and its config presets."""

from lmforge.model.config import PRESETS, ModelConfig, preset
from lmforge.model.transformer import Transformer

__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer"]
