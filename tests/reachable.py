"""What tests look through for a token or secret: everything reachable from an object."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any, Iterator, Mapping


def reachable(obj: Any, seen: set[int] | None = None) -> Iterator[Any]:
    """Everything reachable from obj: containers, dataclass fields (slots too), instance dicts."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from reachable(key, seen)
            yield from reachable(value, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            yield from reachable(item, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from reachable(getattr(obj, f.name), seen)
    elif hasattr(obj, "__dict__") and not callable(obj):
        yield from reachable(vars(obj), seen)


def texts_of(obj: Any, out: list[str], seen: set[int] | None = None, depth: int = 0) -> None:
    """Every value reachable from `obj` through attributes, slots, mappings and sequences, as text."""
    seen = set() if seen is None else seen
    if depth > 12 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        out.append(str(obj))
        return
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        out.extend([repr(data), data.hex(), data.decode("latin-1"), base64.urlsafe_b64encode(data).decode()])
        return
    if isinstance(obj, dict) or hasattr(obj, "items") and callable(obj.items):
        try:
            items = list(obj.items())
        except Exception:
            items = []
        for key, value in items:
            texts_of(key, out, seen, depth + 1)
            texts_of(value, out, seen, depth + 1)
        return
    if isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        for item in obj:
            texts_of(item, out, seen, depth + 1)
        return
    out.append(repr(obj))
    attributes: dict[str, Any] = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(obj, name):
                attributes[name] = getattr(obj, name)
    for name, value in attributes.items():
        if callable(value) and not hasattr(value, "__dict__"):
            continue
        texts_of(value, out, seen, depth + 1)
