"""``COLA_PROVIDER`` -> a provider: built-ins, entry-point plugins, and the
configuration errors that name the missing variable (never a secret)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import pytest

from worker.errors import ConfigError
from worker.providers import registry
from worker.providers.base import Accepted, Provider, SendRequest, SendResult
from worker.providers.meta import FakeProvider, MetaProvider
from worker.providers.twilio import TwilioProvider
from worker.providers.webhook import WebhookProvider
from worker.settings import Settings, load_settings

SECRET = "EAAG-registry-SECRET-987654321"


def settings(**env: str) -> Settings:
    return load_settings(environ=env)


class EchoProvider(Provider):
    name = "echo"

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.closed = False

    def send(self, request: SendRequest) -> SendResult:
        return Accepted(message_id=f"echo-{request.job_id}")

    def close(self) -> None:
        self.closed = True


class FakeEntryPoint:
    """What ``importlib.metadata.entry_points(group=...)`` yields: name, value, load()."""

    def __init__(self, name: str, target: Any, value: str = "acme_whatsapp:make") -> None:
        self.name = name
        self.value = value
        self._target = target

    def load(self) -> Any:
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[str]]:
    """Install fake entry points; returns the list of groups asked for."""
    asked: list[str] = []

    def install(*eps: FakeEntryPoint) -> list[str]:
        def entry_points(*, group: str) -> list[FakeEntryPoint]:
            asked.append(group)
            return list(eps) if group == registry.ENTRY_POINT_GROUP else []

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
        return asked

    return install


def make_echo(settings: Settings, *, max_connections: int) -> Provider:
    return EchoProvider(max_connections)


def test_no_provider_is_an_error_that_says_why() -> None:
    with pytest.raises(ConfigError) as info:
        registry.build_provider(settings())
    message = str(info.value)
    assert "COLA_PROVIDER is not set" in message
    assert "nothing is ever marked sent by accident" in message
    assert info.value.exit_code == 2


def test_unknown_provider_names_the_variable_and_the_known_ones(plugins: Callable[..., list[str]]) -> None:
    plugins()
    with pytest.raises(ConfigError) as info:
        registry.build_provider(settings(COLA_PROVIDER="carrier-pigeon"))
    message = str(info.value)
    assert "COLA_PROVIDER" in message and "carrier-pigeon" in message
    for name in ("meta", "twilio", "webhook", "fake"):
        assert name in message


@pytest.mark.parametrize(
    ("name", "env", "cls"),
    [
        ("meta", {"COLA_META_TOKEN": SECRET, "COLA_META_PHONE_NUMBER_ID": "123"}, MetaProvider),
        ("fake", {}, FakeProvider),
        (
            "twilio",
            {
                "COLA_TWILIO_ACCOUNT_SID": "AC1",
                "COLA_TWILIO_AUTH_TOKEN": SECRET,
                "COLA_TWILIO_FROM": "+14155238886",
            },
            TwilioProvider,
        ),
        ("webhook", {"COLA_WEBHOOK_URL": "http://127.0.0.1:9/send"}, WebhookProvider),
    ],
)
def test_builds_each_builtin(name: str, env: dict[str, str], cls: type[Provider]) -> None:
    provider = registry.build_provider(settings(COLA_PROVIDER=name, **env), max_connections=3)
    try:
        assert type(provider) is cls
        assert provider.name == name
        assert SECRET not in repr(provider)
    finally:
        provider.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"COLA_PROVIDER": "meta", "COLA_META_PHONE_NUMBER_ID": "123"},
            ["COLA_META_TOKEN is not set (or COLA_META_TOKEN_FILE)"],
        ),
        ({"COLA_PROVIDER": "meta", "COLA_META_TOKEN": SECRET}, ["COLA_META_PHONE_NUMBER_ID is not set"]),
        (
            {"COLA_PROVIDER": "meta"},
            ["COLA_META_TOKEN is not set", "COLA_META_PHONE_NUMBER_ID is not set"],
        ),
        (
            {"COLA_PROVIDER": "meta", "COLA_META_TOKEN": SECRET, "COLA_META_PHONE_NUMBER_ID": "1"}
            | {"COLA_META_BASE_URL": "graph.facebook.com"},
            ["COLA_META_BASE_URL must be an http:// or https:// URL"],
        ),
        (
            {"COLA_PROVIDER": "twilio", "COLA_TWILIO_AUTH_TOKEN": SECRET},
            ["COLA_TWILIO_ACCOUNT_SID is not set", "COLA_TWILIO_FROM is not set"],
        ),
        (
            {"COLA_PROVIDER": "twilio", "COLA_TWILIO_ACCOUNT_SID": "AC1", "COLA_TWILIO_FROM": "+1"},
            ["COLA_TWILIO_AUTH_TOKEN is not set (or COLA_TWILIO_AUTH_TOKEN_FILE)"],
        ),
        ({"COLA_PROVIDER": "webhook", "COLA_WEBHOOK_TOKEN": SECRET}, ["COLA_WEBHOOK_URL is not set"]),
        (
            {"COLA_PROVIDER": "webhook", "COLA_WEBHOOK_URL": "ftp://x", "COLA_WEBHOOK_TOKEN": SECRET},
            ["COLA_WEBHOOK_URL must be an http:// or https:// URL"],
        ),
    ],
    ids=[
        "meta-token",
        "meta-phone",
        "meta-both",
        "meta-url",
        "twilio-sid-from",
        "twilio-token",
        "webhook",
        "url",
    ],
)
def test_missing_credentials_name_the_variable_never_the_secret(
    env: dict[str, str], expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        registry.build_provider(settings(**env))
    message = str(info.value)
    for fragment in expected:
        assert fragment in message
    assert SECRET not in message
    assert SECRET not in repr(info.value)


def test_known_providers_lists_builtins_then_plugins(plugins: Callable[..., list[str]]) -> None:
    asked = plugins(FakeEntryPoint("zeta", make_echo), FakeEntryPoint("acme", make_echo))
    assert registry.known_providers() == ("meta", "twilio", "webhook", "fake", "acme", "zeta")
    assert asked == ["cola_worker.providers"]


def test_entry_point_factory_gets_settings_and_pool_size(plugins: Callable[..., list[str]]) -> None:
    received: list[tuple[Settings, int]] = []

    def factory(settings: Settings, *, max_connections: int) -> Provider:
        received.append((settings, max_connections))
        return EchoProvider(max_connections)

    plugins(FakeEntryPoint("acme", factory))
    cfg = settings(COLA_PROVIDER="acme")
    provider = registry.build_provider(cfg, max_connections=7)
    assert isinstance(provider, EchoProvider)
    assert received == [(cfg, 7)]
    result = provider.send(SendRequest(job_id="5", to="+51987654321", sender=None, kind="text", text="x"))
    assert result == Accepted(message_id="echo-5")


def test_entry_point_cannot_shadow_a_builtin(plugins: Callable[..., list[str]]) -> None:
    plugins(FakeEntryPoint("meta", make_echo))
    provider = registry.build_provider(
        settings(COLA_PROVIDER="meta", COLA_META_TOKEN=SECRET, COLA_META_PHONE_NUMBER_ID="1")
    )
    try:
        assert isinstance(provider, MetaProvider)
    finally:
        provider.close()
    assert registry.known_providers().count("meta") == 1


def test_entry_point_that_fails_to_load_is_a_config_error(plugins: Callable[..., list[str]]) -> None:
    plugins(FakeEntryPoint("acme", ModuleNotFoundError("No module named 'acme_whatsapp'")))
    with pytest.raises(ConfigError) as info:
        registry.build_provider(settings(COLA_PROVIDER="acme"))
    message = str(info.value)
    assert "COLA_PROVIDER=acme" in message
    assert "acme_whatsapp" in message


def test_entry_point_returning_a_non_provider_is_a_config_error(plugins: Callable[..., list[str]]) -> None:
    plugins(FakeEntryPoint("acme", lambda settings, max_connections: object()))
    with pytest.raises(ConfigError, match="not a Provider"):
        registry.build_provider(settings(COLA_PROVIDER="acme"))


def test_entry_point_that_is_not_callable_is_a_config_error(plugins: Callable[..., list[str]]) -> None:
    plugins(FakeEntryPoint("acme", "just a string"))
    with pytest.raises(ConfigError, match="not callable"):
        registry.build_provider(settings(COLA_PROVIDER="acme"))
