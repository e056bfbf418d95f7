"""Fine-tuning methods; each built-in one is a plugin module registered through ``register_methods``."""

from .base import AdapterLayer, ApplyContext, Method, MethodConfig, PromptModule

__all__ = ["AdapterLayer", "ApplyContext", "Method", "MethodConfig", "PromptModule"]
