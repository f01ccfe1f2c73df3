"""Role name → actor factory. How the real coordinator, server and device plug in.

The defaults are ``"module:attribute"`` references resolved lazily, so a role's code (and
torch) is imported only by the processes that run it. To plug in an implementation either
define the class at the default path below, or pass ``roles={"server": MyServer}`` to
``run_topology`` / ``run_node`` (``--role-factory server=pkg.mod:MyServer`` on the CLI).
Any callable ``(ActorSpec, ActorEnv) -> Actor`` is a factory; an ``Actor`` subclass is one.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping

from sft_actors.actors.env import ActorFactory
from sft_actors.errors import ConfigError

DEFAULT_ROLE_FACTORIES: Mapping[str, str] = {
    "coordinator": "sft_actors.actors.coordinator:CoordinatorActor",
    "server": "sft_actors.actors.server:server_actor",
    "device": "sft_actors.actors.device:DeviceActor",
}

RoleFactories = Mapping[str, "ActorFactory | str"]


def resolve_factory(ref: ActorFactory | str, *, role: str = "") -> ActorFactory:
    """A factory from a callable or a ``"package.module:attribute"`` reference."""
    if not isinstance(ref, str):
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"role factory {ref!r} must look like 'package.module:Attribute'")
    for_role = f" for role {role!r}" if role else ""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import {module_name!r}{for_role} ({exc}); implement it or pass another factory "
            "(roles={...} / --role-factory ROLE=module:Class)"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{module_name!r} has no callable {attr!r}{for_role}")
    return factory  # type: ignore[no-any-return]


def role_factories(
    roles_used: Iterable[str], overrides: RoleFactories | None = None
) -> dict[str, ActorFactory]:
    """Factories for the roles a node runs: overrides first, then the defaults."""
    chosen: dict[str, ActorFactory | str] = dict(DEFAULT_ROLE_FACTORIES)
    chosen.update(overrides or {})
    out: dict[str, ActorFactory] = {}
    for role in sorted(set(roles_used)):
        if role not in chosen:
            raise ConfigError(f"no actor factory for role {role!r}; pass roles={{{role!r}: ...}}")
        out[role] = resolve_factory(chosen[role], role=role)
    return out


def parse_role_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["server=pkg.mod:Cls", ...]`` from the command line → ``{"server": "pkg.mod:Cls"}``."""
    out: dict[str, str] = {}
    for item in items:
        role, sep, ref = item.partition("=")
        if not sep or not role or not ref:
            raise ConfigError(f"--role-factory {item!r} must look like ROLE=package.module:Class")
        out[role.strip()] = ref.strip()
    return out
