"""The plugin manager: built-in plugins first, then the ``runnel`` entry-point group."""

from __future__ import annotations

import importlib

import pluggy

from . import hookspecs

# Built-ins are ordinary plugins, registered the same way an installed one is.
DEFAULT_PLUGINS = (
    "runnel.serializers",
    "runnel.auth.none",
    "runnel.auth.api_key",
    "runnel.auth.jwt",
    "runnel.backends.python",
    "runnel.surfaces.health",
    "runnel.surfaces.openai",
    "runnel.surfaces.anthropic",
    "runnel.surfaces.runpod",
    "runnel.surfaces.baseten",
    "runnel.surfaces.functions",
)


def make_plugin_manager(*, load_entrypoints: bool = True, plugins=()) -> pluggy.PluginManager:
    """A fresh plugin manager; nothing is loaded until this is called.

    ``plugins`` are extra plugin objects (modules or instances), registered last,
    which is how an embedding application or a test adds its own hooks.
    """
    pm = pluggy.PluginManager("runnel")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entrypoints:
        pm.load_setuptools_entrypoints("runnel")
    for plugin in plugins:
        pm.register(plugin)
    return pm


def describe_plugins(pm: pluggy.PluginManager) -> list[dict]:
    """Name, distribution and hooks of each registered plugin, for ``runnel plugins``."""
    distributions = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        dist = distributions.get(id(plugin))
        rows.append(
            {
                "name": name,
                "distribution": (
                    f"{dist.project_name} {dist.version}" if dist
                    else "runnel (built in)" if name in DEFAULT_PLUGINS
                    else "registered by the application"
                ),
                "hooks": sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()),
            }
        )
    return rows
