"""The plugin manager and the registries it fills.

Built-in methods, backbones, kernels, datasets, metrics and commands are plugins too: they are the
modules in ``DEFAULT_PLUGINS`` and go through the same hooks as a third party's entry point.

Environment variables:
  PEFTMED_STRICT_PLUGINS=1  a plugin that fails to load or registers badly raises instead of being
                            reported and skipped (for plugin authors).
  PEFTMED_PLUGINS=a,b       load only these third-party plugins (entry-point or distribution names);
                            an empty value loads none. Unset: load all installed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import __version__, hookspecs
from .errors import PluginError, UnknownNameError

log = logging.getLogger("peftmed.plugins")

ENTRY_POINT_GROUP = "peftmed"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "peftmed.methods.lora",
    "peftmed.methods.ia3",
    "peftmed.methods.select",
    "peftmed.methods.prompt",
    "peftmed.backbones.custom", "peftmed.backbones.miss.plugin",
    "peftmed.cli.core_commands", "peftmed.cli.kernels_command",
    "peftmed.kernels.plugin",
    "peftmed.data.plugin", "peftmed.metrics.plugin", "peftmed.tasks.vqa",
    "peftmed.bench.cli",
    "peftmed.backbones.hf.plugin",
    "peftmed.scaffold.commands",
    "peftmed.interop.commands",
    "peftmed.train.commands",
    "peftmed.memory.commands",
    "peftmed.deploy.commands",
    "peftmed.report.plugin",
)

# hook name -> registry kind
HOOK_KINDS = {
    "register_methods": "method",
    "register_backbones": "backbone",
    "register_kernels": "kernel",
    "register_datasets": "dataset",
    "register_metrics": "metric",
    "register_tasks": "task",
    "register_commands": "command",
}


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin, as ``peftmed plugins`` shows it."""

    name: str  # entry-point name, or module name for built-ins
    distribution: str  # distribution name ("peftmed" for built-ins)
    version: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)  # kind -> names
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _entry_key(kind: str, obj: Any) -> str:
    if kind == "kernel":
        return f"{obj.op}:{obj.name}"
    return obj.name


class Registry:
    """What every plugin registered: methods, backbones, kernels, datasets, metrics, commands."""

    KINDS = tuple(HOOK_KINDS.values())

    def __init__(self, plugin_manager: pluggy.PluginManager):
        self.plugin_manager = plugin_manager
        self.plugins: list[PluginInfo] = []
        self._entries: dict[str, dict[str, Any]] = {k: {} for k in self.KINDS}
        self._owner: dict[tuple[str, str], PluginInfo] = {}

    # ---- lookups -------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def all(self, kind: str) -> dict[str, Any]:
        return dict(self._entries[kind])

    def get(self, kind: str, name: str) -> Any:
        entries = self._entries[kind]
        if name in entries:
            return entries[name]
        lowered = {k.lower(): k for k in entries}
        if str(name).lower() in lowered:
            return entries[lowered[str(name).lower()]]
        # method aliases (e.g. "T" for full, "PTV2" for ptuning-v2)
        for obj in entries.values():
            if str(name).lower() in {a.lower() for a in getattr(obj, "aliases", ())}:
                return obj
        raise UnknownNameError(kind, name, entries)

    def method(self, name: str):
        return self.get("method", name)

    def backbone(self, name: str):
        return self.get("backbone", name)

    def owner(self, kind: str, name: str) -> PluginInfo | None:
        return self._owner.get((kind, name))

    def failed_plugins(self) -> list[PluginInfo]:
        return [p for p in self.plugins if not p.ok]

    # ---- filling -------------------------------------------------------------------------------
    def _collect(self, info: PluginInfo, plugin: object) -> dict[str, dict[str, Any]]:
        """Call every register hook of one plugin; return what it registered, not yet committed."""
        staged: dict[str, dict[str, Any]] = {k: {} for k in self.KINDS}
        for hook_name, kind in HOOK_KINDS.items():
            caller = getattr(self.plugin_manager.hook, hook_name)
            impls = [impl for impl in caller.get_hookimpls() if impl.plugin is plugin]  # in pluggy's call order
            if not impls:
                continue
            info.hooks.append(hook_name)

            def register(obj, _kind=kind):
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"registered a {_kind} without a string .name: {obj!r}")
                key = _entry_key(_kind, obj)
                if key in staged[_kind]:
                    raise PluginError(f"registered the {_kind} {key!r} twice")
                staged[_kind][key] = obj

            # through pluggy's own calling (what a hook call runs), restricted to this plugin's implementations:
            # its wrappers, tryfirst/trylast and argument passing apply as pluggy documents them. (Not
            # subset_hook_caller: it puts the other plugins in a set, and a plugin object need not be hashable.)
            self.plugin_manager._hookexec(hook_name, impls, {"register": register}, False)
        return staged

    def _commit(self, info: PluginInfo, staged: dict[str, dict[str, Any]]) -> None:
        for kind, objs in staged.items():
            for key in objs:
                if key in self._entries[kind]:
                    other = self._owner[(kind, key)]
                    raise PluginError(
                        f"{kind} {key!r} is registered by both {describe(other)} and {describe(info)}; "
                        f"uninstall one of them or rename the {kind}"
                    )
        for kind, objs in staged.items():
            for key, obj in objs.items():
                self._entries[kind][key] = obj
                self._owner[(kind, key)] = info
                info.registered.setdefault(kind, []).append(key)


def describe(info: PluginInfo) -> str:
    if info.builtin:
        return f"built-in plugin {info.name}"
    return f"plugin {info.name!r} (distribution {info.distribution} {info.version})"


def strict_mode() -> bool:
    return os.environ.get("PEFTMED_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}


def _wanted() -> set[str] | None:
    """The plugin names PEFTMED_PLUGINS selects (None: unset, load every installed plugin)."""
    wanted = os.environ.get("PEFTMED_PLUGINS")
    if wanted is None:
        return None
    return {w.strip() for w in wanted.split(",") if w.strip()}


def _selected(ep: md.EntryPoint) -> bool:
    names = _wanted()
    if names is None:
        return True
    dist = ep.dist.name if ep.dist is not None else ""
    return ep.name in names or dist in names


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def build_registry(
    *,
    load_entrypoints: bool = True,
    extra_plugins: Iterable[object] = (),
    strict: bool | None = None,
    default_plugins: Iterable[str] = DEFAULT_PLUGINS,
) -> Registry:
    """Build a fresh plugin manager and registry (tests call this for isolation).

    ``extra_plugins`` are plugin objects (modules or instances) registered after the built-ins,
    as if installed; handy for tests and notebooks.
    """
    strict = strict_mode() if strict is None else strict
    pm = new_plugin_manager()
    registry = Registry(pm)

    candidates: list[tuple[PluginInfo, Callable[[], object]]] = []
    for modname in default_plugins:
        info = PluginInfo(modname, "peftmed", _peftmed_version(), builtin=True)
        candidates.append((info, lambda m=modname: importlib.import_module(m)))
    for i, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{i}"
        info = PluginInfo(name, "(in-process)", "", builtin=False)
        candidates.append((info, lambda p=plugin: p))
    if load_entrypoints:
        installed = list(md.entry_points(group=ENTRY_POINT_GROUP))
        wanted = _wanted() or set()
        present = {ep.name for ep in installed} | {ep.dist.name for ep in installed if ep.dist is not None}
        for name in sorted(wanted - present):
            message = (f"PEFTMED_PLUGINS names {name!r}, but no installed peftmed plugin has that entry-point or "
                       f"distribution name (installed: {', '.join(sorted(present)) or 'none'})")
            if strict:
                raise PluginError(message)
            log.warning(message)
        for ep in installed:
            if not _selected(ep):
                continue
            dist = ep.dist.name if ep.dist is not None else "(unknown distribution)"
            version = ep.dist.version if ep.dist is not None else "?"
            info = PluginInfo(ep.name, dist, version, builtin=False)
            candidates.append((info, ep.load))

    for info, load in candidates:
        plugin = None
        try:
            with _guarded_load() as interrupted:
                try:
                    plugin = load()
                except KeyboardInterrupt:
                    if interrupted:  # the user's Ctrl-C while loading: stop
                        raise
                    raise _PluginInterrupt("the plugin raised KeyboardInterrupt while loading") from None
            if pm.is_registered(plugin):
                raise PluginError(f"is already registered under another name ({pm.get_name(plugin)})")
            pm.register(plugin, name=info.name)
            _check_unknown_hooks(pm, plugin)
            staged = registry._collect(info, plugin)
            registry._commit(info, staged)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin must not break the rest (sys.exit() at import included)
            if plugin is not None and pm.is_registered(plugin):
                pm.unregister(plugin)
            info.error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, SystemExit):
                info.error = f"SystemExit({exc.code!r}): the plugin called sys.exit() while loading"
            message = f"{describe(info)} failed to load and was skipped: {info.error}"
            if strict or (info.builtin and not isinstance(exc, PluginError)):
                registry.plugins.append(info)
                raise PluginError(message) from None if isinstance(exc, SystemExit) else exc
            log.warning(message)
        registry.plugins.append(info)
    return registry


class _PluginInterrupt(Exception):
    """A plugin stopped the process while loading (KeyboardInterrupt it raised itself, or os._exit)."""


@contextlib.contextmanager
def _guarded_load():
    """While a plugin's module is imported: a KeyboardInterrupt the plugin raises itself is told apart from the
    user's Ctrl-C (a real SIGINT is recorded in the yielded list), and ``os._exit`` raises instead of ending the
    process, so the plugin is reported and skipped instead of stopping every command."""
    interrupted: list[int] = []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    def no_exit(code=0):
        raise _PluginInterrupt(f"the plugin called os._exit({code!r}) while loading")

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    real_exit = os._exit
    os._exit = no_exit
    try:
        yield interrupted
    finally:
        os._exit = real_exit
        if main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _check_unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> None:
    """A hookimpl whose name is not a peftmed hook is a typo: fail loudly, naming it."""
    for hook_name in dir(pm.hook):
        if hook_name.startswith("_"):
            continue
        caller = getattr(pm.hook, hook_name)
        if caller.spec is None and any(i.plugin is plugin for i in caller.get_hookimpls()):
            raise PluginError(
                f"implements unknown hook {hook_name!r}; peftmed hooks are: {', '.join(HOOK_KINDS)}"
            )


def _peftmed_version() -> str:
    return __version__


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry, built on first use (never at import time)."""
    global _default
    if _default is None:
        _default = build_registry()
    return _default


def set_default_registry(registry: Registry | None) -> None:
    """Replace (or with None, drop) the process-wide registry; tests use this."""
    global _default
    _default = registry


def plugin_versions(registry: Registry | None = None) -> dict[str, str]:
    registry = registry or default_registry()
    return {p.distribution: p.version for p in registry.plugins if not p.builtin and p.ok}
