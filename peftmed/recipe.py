"""Recipes: which method each component gets, in text and JSON, mirroring the papers' rows.

Text form (items separated by spaces, ';' or newlines)::

    vision=full fusion=lora(r=8,alpha=16) decoder=lora(r=8,alpha=16)
    *=layernorm
    fusion=lora(r=8,roles=[attn.q,attn.v])+layernorm decoder=prefix(n=10)

``*`` gives every component not named elsewhere; components not named are frozen. A bare method
(``layernorm``, ``frozen``) is the same as ``*=`` that method. A component may
combine methods with ``+``. The papers' row form ``T|LoRA|LoRA`` is read positionally against the
backbone's components (``T``, ``F``, ``PTV2`` are aliases of the methods ``full``, ``frozen``,
``ptuning-v2``). A method that trains nothing (``frozen``) is kept in the recipe and skipped when it is
applied. A recipe round-trips text -> object -> text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RecipeError, UnknownNameError
from .options import parse_scalar

WILDCARD = "*"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")



@dataclass(frozen=True)
class MethodCall:
    """One method with its options, e.g. ``lora(r=8, alpha=16)``."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_text(self) -> str:
        if not self.options:
            return self.name
        inner = ",".join(f"{k}={_render(v)}" for k, v in self.options.items())
        return f"{self.name}({inner})"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "options": dict(self.options)}

    def __hash__(self):
        return hash((self.name, json.dumps(dict(self.options), sort_keys=True, default=str)))


@dataclass
class Recipe:
    """target (a component name or ``*``) -> methods applied there, in order."""

    entries: dict[str, tuple[MethodCall, ...]] = field(default_factory=dict)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | Recipe | Mapping, components: Sequence[str] | None = None) -> Recipe:
        """Read a recipe from text, a JSON-like dict, or return a Recipe unchanged.

        ``components`` (the backbone's, in order) is needed only for the row form ``T|LoRA|LoRA``.
        """
        if isinstance(text, Recipe):
            return text
        if isinstance(text, Mapping):
            return cls.from_dict(text)
        if not isinstance(text, str):
            raise RecipeError(f"a recipe is text or a dict, not {type(text).__name__}")
        stripped = text.strip()
        if not stripped:
            raise RecipeError("empty recipe; write e.g. 'fusion=lora(r=8)' or '*=layernorm'")
        if stripped.startswith("{"):
            try:
                return cls.from_dict(json.loads(stripped))
            except json.JSONDecodeError as exc:
                raise RecipeError(f"recipe looks like JSON but does not parse: {exc}") from exc
        head = stripped.split("(")[0]
        if "=" not in head and "|" in stripped:
            return cls._parse_row(stripped, components)
        if "=" not in head and _BARE.match(head.split("+")[0].strip()):
            return cls({WILDCARD: _Parser(stripped).methods()})  # a bare method: every component ('frozen')
        if "=" not in stripped:
            raise RecipeError(
                f"cannot read recipe {text!r}: expected items 'component=method(...)' (e.g. "
                f"'fusion=lora(r=8)'), '*=method', or a row like 'T|LoRA|LoRA'"
            )
        return _Parser(stripped).recipe()

    @classmethod
    def _parse_row(cls, text: str, components: Sequence[str] | None) -> Recipe:
        cells = [c.strip() for c in text.split("|")]
        if components is None:
            raise RecipeError(
                f"the row form {text!r} needs the backbone's component order; pass --backbone"
            )
        if len(cells) != len(components):
            raise RecipeError(
                f"row {text!r} has {len(cells)} cells but the backbone has {len(components)} "
                f"components ({'|'.join(components)})"
            )
        entries: dict[str, tuple[MethodCall, ...]] = {}
        for comp, cell in zip(components, cells):
            if not cell:
                raise RecipeError(f"row {text!r}: empty cell for component {comp!r}")
            entries[comp] = _Parser(cell).methods()  # T, F, LoRA, PTV2...: method names or aliases
        return cls(entries)

    @classmethod
    def from_dict(cls, data: Mapping) -> Recipe:
        """From the JSON form: ``{"fusion": [{"method": "lora", "options": {"r": 8}}], ...}``."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe in JSON form is a mapping of component -> methods, got {data!r}")
        entries: dict[str, tuple[MethodCall, ...]] = {}
        for target, calls in data.items():
            if not isinstance(target, str) or not (target == WILDCARD or _BARE.match(target)):
                raise RecipeError(f"recipe target {target!r} is not a component name (or '*')")
            if isinstance(calls, (str, Mapping)):
                calls = [calls]
            if not isinstance(calls, (list, tuple)) or not calls:
                raise RecipeError(f"recipe entry for {target!r} must be a method or a non-empty list of methods, "
                                  f"got {calls!r}")
            parsed = []
            for call in calls:
                if isinstance(call, str):
                    parsed.extend(_Parser(call).methods())
                elif isinstance(call, Mapping) and "method" in call:
                    unknown = set(call) - {"method", "options"}
                    if unknown:
                        raise RecipeError(f"recipe entry for {target!r} has unknown keys {sorted(map(str, unknown))}")
                    name, options = call["method"], call.get("options") or {}
                    if not isinstance(name, str) or not _BARE.match(name):
                        raise RecipeError(f"recipe entry for {target!r}: method {name!r} is not a method name")
                    if not isinstance(options, Mapping) or not all(isinstance(k, str) and _BARE.match(k)
                                                                   for k in options):
                        raise RecipeError(f"recipe entry for {target!r}: options {options!r} must map option names "
                                          f"to values")
                    parsed.append(MethodCall(name, dict(options)))
                else:
                    raise RecipeError(
                        f"recipe entry for {target!r} must be 'method(...)' text or "
                        f"{{'method': ..., 'options': {{...}}}}, got {call!r}"
                    )
            entries[target] = tuple(parsed)
        return cls(entries)

    # ---- output ------------------------------------------------------------------------------------
    def to_text(self) -> str:
        return " ".join(f"{t}={'+'.join(c.to_text() for c in calls)}" for t, calls in self.entries.items())

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {t: [c.to_dict() for c in calls] for t, calls in self.entries.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    def __str__(self) -> str:
        return self.to_text()

    # ---- use ---------------------------------------------------------------------------------------
    def resolve(self, components: Iterable[str]) -> dict[str, tuple[MethodCall, ...]]:
        """Component -> methods, with ``*`` expanded; components with no method are left out."""
        components = list(components)

        for target in self.entries:
            if target != WILDCARD and target not in components:
                raise UnknownNameError("component", target, components)
        out: dict[str, tuple[MethodCall, ...]] = {}
        for comp in components:
            calls = self.entries.get(comp, self.entries.get(WILDCARD, ()))
            if calls:
                out[comp] = calls
        return out

    def canonical(self, registry) -> Recipe:
        """The same recipe with every method written by its registered name (``T`` -> ``full``, ``LoRA`` ->
        ``lora``, ``PTV2`` -> ``ptuning-v2``); unknown names raise UnknownNameError."""
        return Recipe({target: tuple(MethodCall(registry.method(c.name).name, dict(c.options)) for c in calls)
                       for target, calls in self.entries.items()})

    def trained(self, components: Iterable[str], registry) -> dict[str, tuple[MethodCall, ...]]:
        """Like ``resolve``, without the calls of methods that train nothing (``frozen`` and its aliases
        ``F``, ``none``); every name is looked up in ``registry`` (unknown names raise)."""
        out: dict[str, tuple[MethodCall, ...]] = {}
        for comp, calls in self.resolve(components).items():
            kept = tuple(c for c in calls if not registry.method(c.name).trains_nothing)
            if kept:
                out[comp] = kept
        return out

    def row(self, components: Sequence[str], registry=None) -> str:
        """The papers' row form, e.g. ``F|LoRA|LoRA`` (display only; options are dropped)."""
        resolved = self.trained(components, registry) if registry is not None else self.resolve(components)
        cells = []
        for comp in components:
            calls = resolved.get(comp, ())
            if not calls:
                cells.append("F")
                continue
            names = []
            for c in calls:
                label = c.name
                if registry is not None:
                    try:
                        label = registry.method(c.name).short_label
                    except Exception:  # display only
                        pass
                names.append(label)
            cells.append("+".join(names))
        return "|".join(cells)


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_render(v) for v in value) + "]"
    text = str(value)
    if _BARE.match(text) and isinstance(parse_scalar(text), str):  # would read back as this text
        return text
    return json.dumps(text)


class _Parser:
    """A small recursive-descent reader of the text form; errors point at the column."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, what: str) -> RecipeError:
        caret = " " * self.pos + "^"
        return RecipeError(f"cannot read recipe: {what} at column {self.pos + 1}\n  {self.text}\n  {caret}")

    def skip(self, seps: str = " \t") -> None:
        while self.pos < len(self.text) and self.text[self.pos] in seps:
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.fail(f"expected {ch!r}, found {self.peek() or 'end of text'!r}")
        self.pos += 1

    def name(self) -> str:
        m = _NAME.match(self.text, self.pos)
        if not m:
            raise self.fail(f"expected a name, found {self.peek() or 'end of text'!r}")
        self.pos = m.end()
        return m.group(0)

    def recipe(self) -> Recipe:
        entries: dict[str, tuple[MethodCall, ...]] = {}
        self.skip(" \t\n;,")
        while self.pos < len(self.text):
            if self.peek() == WILDCARD:
                target = WILDCARD
                self.pos += 1
            else:
                target = self.name()
            self.skip()
            self.expect("=")
            self.skip()
            if target in entries:
                raise self.fail(f"component {target!r} is assigned twice (combine methods with '+')")
            entries[target] = self.methods(stop=" \t\n;")
            self.skip(" \t\n;,")
        return Recipe(entries)

    def methods(self, stop: str = "") -> tuple[MethodCall, ...]:
        calls = [self.call()]
        while self.peek() == "+":
            self.pos += 1
            calls.append(self.call())
        if self.pos < len(self.text) and self.peek() not in stop:
            raise self.fail(f"unexpected {self.peek()!r}")
        names = [c.name.lower() for c in calls]
        for n in set(names):
            if names.count(n) > 1:
                raise RecipeError(f"method {n!r} appears twice on one component in {self.text!r}")
        return tuple(calls)

    def call(self) -> MethodCall:
        self.skip()
        name = self.name()
        options: dict[str, Any] = {}
        if self.peek() == "(":
            self.pos += 1
            self.skip()
            while self.peek() != ")":
                key = self.name()
                self.skip()
                self.expect("=")
                self.skip()
                if key in options:
                    raise self.fail(f"option {key!r} given twice")
                options[key] = self.value()
                self.skip()
                if self.peek() == ",":
                    self.pos += 1
                    self.skip()
                elif self.peek() != ")":
                    raise self.fail(f"expected ',' or ')', found {self.peek() or 'end of text'!r}")
            self.pos += 1
        return MethodCall(name, options)

    def value(self) -> Any:
        ch = self.peek()
        if ch == "[":
            self.pos += 1
            items = []
            self.skip()
            while self.peek() != "]":
                items.append(self.value())
                self.skip()
                if self.peek() == ",":
                    self.pos += 1
                    self.skip()
                elif self.peek() != "]":
                    raise self.fail(f"expected ',' or ']', found {self.peek() or 'end of text'!r}")
            self.pos += 1
            return items
        if ch in "\"'":
            end = self.text.find(ch, self.pos + 1)
            if end < 0:
                raise self.fail("unterminated string")
            raw = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return raw
        m = re.compile(r"[^,()\[\]\s]+").match(self.text, self.pos)
        if not m:
            raise self.fail(f"expected a value, found {ch or 'end of text'!r}")
        self.pos = m.end()
        return parse_scalar(m.group(0))
