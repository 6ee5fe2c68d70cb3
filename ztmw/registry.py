"""Plugins by name from entry points: only the names the configuration lists are ever loaded.

An unknown name, a plugin that cannot be imported or a factory that refuses its config section stops start-up
with a ConfigurationError that names it; nothing is loaded just because it is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Mapping

from .errors import ConfigurationError
from .typing import PluginDeps

GROUPS = ("ztmw.verifiers", "ztmw.trust_evaluators", "ztmw.identity_resolvers", "ztmw.conditions",
          "ztmw.audit_sinks")


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    name: str
    group: str
    instance: Any
    distribution: str
    version: str


def available(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def load_plugin(group: str, name: str, settings: Mapping[str, Any], deps: PluginDeps) -> LoadedPlugin:
    if group not in GROUPS:
        raise ValueError(f"not a ztmw plugin group: {group}")
    found = available(group)
    entry_point = found.get(name)
    if entry_point is None:
        known = ", ".join(sorted(found)) or "none installed"
        raise ConfigurationError(f"unknown plugin {name!r} in group {group} (available: {known})")
    try:
        factory = entry_point.load()
    except Exception as exc:
        raise ConfigurationError(f"plugin {name!r} ({entry_point.value}) cannot be imported: {exc!r}") from exc
    try:
        instance = factory(settings, deps)
    except ConfigurationError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"plugin {name!r} failed to start: {exc!r}") from exc
    dist = entry_point.dist
    return LoadedPlugin(
        name=name,
        group=group,
        instance=instance,
        distribution=dist.name if dist is not None else "unknown",
        version=dist.version if dist is not None else "unknown",
    )
