"""Backbones: architectures with their components and role maps, registered as plugins."""

from .base import COMPONENTS, ROLES, Backbone

__all__ = ["COMPONENTS", "ROLES", "Backbone"]
