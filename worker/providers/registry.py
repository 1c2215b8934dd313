"""Which provider a run uses: ``COLA_PROVIDER`` names a built-in (meta,
twilio, webhook, fake) or an entry point in the ``cola_worker.providers``
group. An entry point resolves to a callable
``factory(settings, max_connections=...) -> Provider``.

Built-ins are imported lazily (httpx is not needed to list names), and a
plugin cannot shadow a built-in name.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

from worker.errors import ConfigError
from worker.providers.base import Provider
from worker.settings import PROVIDERS_BUILTIN, Settings

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "cola_worker.providers"

ProviderFactory = Callable[..., Provider]


def _plugin_entry_points() -> dict[str, Any]:
    """Entry points of the group by name, minus those shadowing a built-in."""
    found: dict[str, Any] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in PROVIDERS_BUILTIN:
            logger.warning(
                "entry point %r in %s ignored: it would shadow a built-in provider",
                ep.name,
                ENTRY_POINT_GROUP,
            )
            continue
        found.setdefault(ep.name, ep)
    return found


def known_providers() -> tuple[str, ...]:
    """Built-in names first, then installed plugins, sorted."""
    return PROVIDERS_BUILTIN + tuple(sorted(_plugin_entry_points()))


def _builtin_factory(name: str) -> ProviderFactory:
    if name == "meta":
        from worker.providers.meta import MetaProvider

        return MetaProvider.from_settings
    if name == "fake":
        from worker.providers.meta import FakeProvider

        return FakeProvider.from_settings
    if name == "twilio":
        from worker.providers.twilio import TwilioProvider

        return TwilioProvider.from_settings
    from worker.providers.webhook import WebhookProvider

    return WebhookProvider.from_settings


def build_provider(settings: Settings, *, max_connections: int = 16) -> Provider:
    """The provider named by ``settings.provider``. Raises :class:`ConfigError`
    naming the variable that is missing or wrong; never includes a secret."""
    name = settings.provider
    if name is None:
        raise ConfigError(
            "COLA_PROVIDER is not set: choose one of "
            f"{', '.join(known_providers())} (nothing is ever marked sent by accident)"
        )
    if name in PROVIDERS_BUILTIN:
        return _builtin_factory(name)(settings, max_connections=max_connections)

    plugins = _plugin_entry_points()
    if name not in plugins:
        raise ConfigError(f"COLA_PROVIDER: unknown provider {name!r} (known: {', '.join(known_providers())})")
    ep = plugins[name]
    try:
        factory = ep.load()
    except Exception as exc:
        raise ConfigError(
            f"COLA_PROVIDER={name}: cannot load entry point {ep.value!r} "
            f"of {ENTRY_POINT_GROUP}: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(factory):
        raise ConfigError(f"COLA_PROVIDER={name}: entry point {ep.value!r} is not callable")
    provider = factory(settings, max_connections=max_connections)
    if not isinstance(provider, Provider):
        raise ConfigError(
            f"COLA_PROVIDER={name}: entry point {ep.value!r} returned "
            f"{type(provider).__name__}, not a Provider"
        )
    return provider
