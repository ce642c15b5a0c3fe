"""Which layer-1 methods exist: ``method.name`` → its :class:`~dladiff.layer1.phases.Method` class.

A method module defines its settings dataclass and its class and decorates the class with
:func:`register`. The built-in modules (:data:`BUILTIN_MODULES`) are imported on the first look-up,
so that loading a config (:mod:`dladiff.config` validates ``method:`` against the registry) sees
every built-in method and any method registered before by other code (a plugin, a test).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dladiff.errors import DladiffError

if TYPE_CHECKING:
    from dladiff.layer1.phases import Method

BUILTIN_MODULES = ("dladiff", "aspl", "fsmg", "mist", "anti_diffusion", "disdiff")
"""Modules under ``dladiff.methods`` holding the built-in methods, in the order of ``docs/methods.md``."""

_METHODS: dict[str, type[Method]] = {}
_builtins_loaded = False


def register(cls: type[Method]) -> type[Method]:
    """Add method ``cls`` under ``cls.name`` (a class decorator); a name is registered once."""
    methods()  # the built-in ones first
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise DladiffError(f"a layer-1 method named {cls.name!r} is registered already ({_METHODS[cls.name].__module__})")
    _METHODS[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove the method ``name`` (a plugin or test that registered one cleans up)."""
    _METHODS.pop(name, None)


def methods() -> dict[str, type[Method]]:
    """Every registered method by name: the built-in ones in :data:`BUILTIN_MODULES` order, then the others."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(f"dladiff.methods.{module}")
    builtin = [f"dladiff.methods.{module}" for module in BUILTIN_MODULES]
    rank = {name: builtin.index(cls.__module__) if cls.__module__ in builtin else len(builtin)
            for name, cls in _METHODS.items()}
    return {name: _METHODS[name] for name in sorted(_METHODS, key=rank.__getitem__)}


def method_class(name: str) -> type[Method]:
    """The class of method ``name``; a clear error for unknown names."""
    registered = methods()
    try:
        return registered[name]
    except KeyError:
        raise DladiffError(f"unknown method {name!r}; choose one of {', '.join(registered)}") from None


def settings_classes() -> dict[str, type]:
    """``method:`` section key → settings dataclass of every registered method that has settings."""
    return {cls.settings_key(): cls.Settings for cls in methods().values() if cls.Settings is not None}
