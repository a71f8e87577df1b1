"""Name -> builder registries with errors that list what is known (timm's ``list_models`` idea).

Every pluggable piece (datasets, encoders, losses, negative samplers) is looked up by name
through a :class:`Registry`, so configs name things and the training loop never branches on a
method name.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from modalities.errors import ProjectError

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError, ProjectError):
    """A name that is not registered. Subclasses both KeyError and ValueError on purpose:
    callers that treat it as a bad lookup or as a bad config value both catch it."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection of builders, each with free-form metadata.

    >>> ENCODERS = Registry("encoder")
    >>> @ENCODERS.register("mlp", input_kinds=("vector",))
    ... def mlp(spec, num_classes): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known {self.plural}: {', '.join(self.names())}"

    @property
    def plural(self) -> str:
        """``datasets``, ``encoders``, ``losses``: the kind in the plural, for messages."""
        return self.kind + ("es" if self.kind.endswith(("s", "x", "sh", "ch")) else "s")

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return dict(self._meta[name])

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
