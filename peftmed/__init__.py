"""peftmed: parameter-efficient fine-tuning of medical vision-language models.

    import peftmed
    model = peftmed.build_backbone("miss-tiny")
    pm = peftmed.apply(model, "vision=full fusion=lora(r=8,alpha=16) decoder=lora(r=8,alpha=16)")
    print(pm.trainable_report())
"""

__version__ = "0.1.0"

from .backbones.base import Backbone  # noqa: E402
from .errors import (  # noqa: E402
    AdapterError,
    ConfigError,
    NoMatchError,
    PeftmedError,
    PluginError,
    RecipeError,
    ShapeError,
    UnknownNameError,
)
from .hookspecs import hookimpl  # noqa: E402
from .methods.base import AdapterLayer, ApplyContext, Method, MethodConfig, PromptModule, compute_dtype  # noqa: E402
from .model import PeftModel, apply, load_adapter  # noqa: E402
from .plugins import build_registry, default_registry  # noqa: E402
from .recipe import MethodCall, Recipe  # noqa: E402


def build_backbone(name: str, **options):
    """Build a fresh model of the registered backbone ``name`` (random weights, no download)."""
    return default_registry().backbone(name).build(**options)


def get_backbone(name: str) -> Backbone:
    return default_registry().backbone(name)


__all__ = [
    "AdapterError", "AdapterLayer", "ApplyContext", "Backbone", "ConfigError", "Method", "MethodCall",
    "MethodConfig", "NoMatchError", "PeftModel", "PeftmedError", "PluginError", "PromptModule", "Recipe", "RecipeError",
    "ShapeError", "UnknownNameError", "__version__", "apply", "build_backbone", "build_registry", "compute_dtype",
    "default_registry", "get_backbone", "hookimpl", "load_adapter",
]
