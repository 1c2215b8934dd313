"""Configuration: read from ``COLA_*`` environment variables and CLI flags in
one place, into one frozen :class:`Settings` object that is passed down.

Nothing else in the package reads ``os.environ``. A flag beats the environment,
which beats the default. Secrets and the database URL have no flag (``ps``
would show it); each of them may instead be read from a file named by
``X_FILE``; setting both ``X`` and ``X_FILE`` is an error.

This module is imported on the lock fast path: standard library only.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from worker.errors import ConfigError

PROVIDERS_BUILTIN = ("meta", "twilio", "webhook", "fake")


def default_lock_file(uid: int | None = None) -> str:
    """The lock path when ``COLA_LOCK_FILE`` is not set, for the user ``uid``
    (default: this process's real uid).

    It depends on the uid only, never on the environment: a cron job (no
    ``XDG_RUNTIME_DIR``, maybe no ``HOME``) and an interactive shell of the
    same user must meet on the same file, or their runs would overlap. The
    home directory comes from the password database:
    ``<home>/.local/state/cola-worker/cola-worker.lock``; a uid without an
    entry or whose home does not exist (containers run with an arbitrary uid)
    gets ``/tmp/cola-worker-<uid>/cola-worker.lock`` (the lock refuses that
    directory unless this user owns it, see :mod:`worker.lock`)."""
    uid = os.getuid() if uid is None else uid
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        home = ""
    if home and home != "/" and os.path.isdir(home):
        return os.path.join(home, ".local", "state", "cola-worker", "cola-worker.lock")
    return f"/tmp/cola-worker-{uid}/cola-worker.lock"


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # attribute name; env var is COLA_<NAME>, flag is --<name-with-dashes>
    kind: str  # "str", "int", "float", "bool", "choice"
    default: Any
    help: str
    secret: bool = False  # no flag, never printed, *_FILE variant
    flag: bool = True
    minimum: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def env(self) -> str:
        return "COLA_" + self.name.upper()

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("database_url", "str", None, "SQLAlchemy database URL", secret=True, flag=False),
    Option("provider", "str", None, "provider: meta, twilio, webhook, fake or an entry point name"),
    Option("meta_base_url", "str", "https://graph.facebook.com", "WhatsApp Cloud API base URL"),
    Option("meta_api_version", "str", "v21.0", "WhatsApp Cloud API version"),
    Option("meta_phone_number_id", "str", None, "default sender phone number id"),
    Option("meta_token", "str", None, "WhatsApp Cloud API access token", secret=True, flag=False),
    Option("twilio_base_url", "str", "https://api.twilio.com", "Twilio API base URL"),
    Option("twilio_account_sid", "str", None, "Twilio account SID"),
    Option("twilio_api_key", "str", None, "Twilio API key SID (default: the account SID)"),
    Option("twilio_auth_token", "str", None, "Twilio auth token or API key secret", secret=True, flag=False),
    Option("twilio_from", "str", None, "default Twilio WhatsApp sender number (E.164)"),
    Option("webhook_url", "str", None, "URL of the generic JSON webhook provider"),
    Option("webhook_token", "str", None, "bearer token for the webhook provider", secret=True, flag=False),
    Option("fake_base_url", "str", "http://127.0.0.1:8765", "base URL of the local sandbox (fake-provider)"),
    Option("lock_file", "str", None, "file lock path (default: per uid, under ~/.local/state/cola-worker)"),
    Option("lock_timeout", "float", 0.0, "seconds to wait for the file lock (0: exit at once)", minimum=0),
    Option("max_jobs", "int", 50, "rows claimed per run (0: no limit)", minimum=0),
    Option("max_seconds", "float", 7200.0, "time limit of one run, seconds", minimum=0.001),
    Option("concurrency", "int", 32, "messages in flight at once", minimum=1),
    Option("batch_size", "int", 50, "rows claimed per claim transaction", minimum=1),
    Option("rate_limit", "float", 80.0, "messages per second per process", minimum=0.001),
    Option("pair_interval", "float", 6.0, "minimum seconds between two messages to one recipient", minimum=0),
    Option("max_attempts", "int", 5, "default attempts before a row ends in error", minimum=1),
    Option(
        "backoff_base",
        "float",
        30.0,
        "first retry delay, seconds (doubles each attempt, with jitter)",
        minimum=0,
    ),
    Option("backoff_max", "float", 3600.0, "longest retry delay, seconds", minimum=0),
    Option("lease_seconds", "float", 300.0, "how long a silent run keeps its rows, seconds", minimum=1),
    Option("connect_timeout", "float", 5.0, "provider connect timeout, seconds", minimum=0.001),
    Option("read_timeout", "float", 30.0, "provider read timeout, seconds", minimum=0.001),
    Option(
        "max_connect_failures",
        "int",
        5,
        "consecutive provider connection failures (nothing sent) that stop the run (exit 6)",
        minimum=1,
    ),
    Option(
        "db_lock_timeout",
        "float",
        5.0,
        "database row-lock wait limit per statement, seconds (0: the server's default)",
        minimum=0,
    ),
    Option(
        "db_statement_timeout",
        "float",
        30.0,
        "database statement time limit, seconds (0: none; db upgrade has none)",
        minimum=0,
    ),
    Option("default_region", "str", None, "region for numbers written without +country code (e.g. PE)"),
    Option(
        "templates_file",
        "str",
        None,
        "enqueue: YAML or JSON file of the known templates (name, language, parameters); "
        "unset: not checked before sending",
    ),
    Option("log_format", "choice", "text", "log format", choices=("text", "json")),
    Option("log_level", "choice", "INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("poll_interval", "float", 5.0, "--loop: seconds between polls of an empty queue", minimum=0.01),
    Option("metrics_port", "int", 9108, "--loop: port of /metrics and /healthz (0: off)", minimum=0),
    Option(
        "keep_keys_days",
        "float",
        365.0,
        "prune: days the dedupe key of a pruned row is kept (importing it again inserts nothing); "
        "at least --older-than-days",
        minimum=0,
    ),
    # `cola-worker receipts`: the delivery-receipt server (docs/providers.md).
    Option("receipts_host", "str", "127.0.0.1", "receipts: address to listen on (flag --host)"),
    Option("receipts_port", "int", 8766, "receipts: port to listen on (flag --port)", minimum=0),
    Option(
        "receipts_public_url",
        "str",
        None,
        "receipts: public base URL the providers call (Twilio signs it; default: the request's own)",
    ),
    Option(
        "meta_app_secret",
        "str",
        None,
        "Meta app secret: verifies X-Hub-Signature-256",
        secret=True,
        flag=False,
    ),
    Option(
        "meta_verify_token",
        "str",
        None,
        "token of Meta's webhook verification handshake",
        secret=True,
        flag=False,
    ),
    Option(
        "webhook_secret",
        "str",
        None,
        "HMAC key of the webhook provider's status callbacks",
        secret=True,
        flag=False,
    ),
    Option("receipts_max_body", "int", 1048576, "receipts: largest request body accepted, bytes", minimum=1),
    Option(
        "receipt_window",
        "float",
        3600.0,
        "seconds an incierto row waits for a receipt before status and audit report it",
        minimum=0,
    ),
    Option(
        "receipt_sweep",
        "float",
        5.0,
        "receipts: seconds between settle sweeps of incierto rows",
        minimum=0.05,
    ),
    Option(
        "opt_out_words", "str", "STOP,BAJA,ALTO", "inbound words that ask for no more messages (comma list)"
    ),
)

OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str | None
    provider: str | None
    meta_base_url: str
    meta_api_version: str
    meta_phone_number_id: str | None
    meta_token: str | None
    twilio_base_url: str
    twilio_account_sid: str | None
    twilio_api_key: str | None
    twilio_auth_token: str | None
    twilio_from: str | None
    webhook_url: str | None
    webhook_token: str | None
    fake_base_url: str
    lock_file: str
    lock_timeout: float
    max_jobs: int
    max_seconds: float
    concurrency: int
    batch_size: int
    rate_limit: float
    pair_interval: float
    max_attempts: int
    backoff_base: float
    backoff_max: float
    lease_seconds: float
    connect_timeout: float
    max_connect_failures: int
    read_timeout: float
    db_lock_timeout: float
    db_statement_timeout: float
    default_region: str | None
    templates_file: str | None
    log_format: str
    log_level: str
    poll_interval: float
    metrics_port: int
    keep_keys_days: float
    receipts_host: str
    receipts_port: int
    receipts_public_url: str | None
    meta_app_secret: str | None
    meta_verify_token: str | None
    webhook_secret: str | None
    receipts_max_body: int
    receipt_window: float
    receipt_sweep: float
    opt_out_words: str

    def __repr__(self) -> str:  # secrets never printed, even by accident
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            opt = OPTIONS_BY_NAME.get(f.name)
            if opt is not None and opt.secret and value is not None:
                value = "***"
            parts.append(f"{f.name}={value!r}")
        return "Settings(" + ", ".join(parts) + ")"

    __str__ = __repr__

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "COLA_DATABASE_URL is not set (an SQLAlchemy URL, e.g. "
                "mysql+pymysql://user@host/db; or COLA_DATABASE_URL_FILE)"
            )
        return self.database_url


def _convert(opt: Option, raw: Any, source: str) -> Any:
    if raw is None:
        return None
    if opt.kind == "str":
        value: Any = str(raw).strip()
        if value == "":
            return None
        return value
    if opt.kind == "choice":
        value = str(raw).strip()
        canon = {c.lower(): c for c in opt.choices or ()}
        if value.lower() not in canon:
            raise ConfigError(f"{source}: {value!r} is not one of {', '.join(opt.choices or ())}")
        return canon[value.lower()]
    caster: Callable[[str], Any] = int if opt.kind == "int" else float
    try:
        value = caster(str(raw).strip())
    except ValueError:
        kind = "an integer" if opt.kind == "int" else "a number"
        raise ConfigError(f"{source}: {raw!r} is not {kind}") from None
    if opt.kind == "float" and value != value:  # NaN
        raise ConfigError(f"{source}: {raw!r} is not a number")
    if opt.minimum is not None and value < opt.minimum:
        raise ConfigError(f"{source}: {raw!r} must be at least {opt.minimum:g}")
    return value


def _read_secret(opt: Option, environ: Mapping[str, str]) -> str | None:
    direct = environ.get(opt.env)
    file_var = opt.env + "_FILE"
    path = environ.get(file_var)
    if direct and path:
        raise ConfigError(f"{opt.env} and {file_var} are both set; set only one")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                content = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"{file_var}: cannot read {path!r}: {exc.strerror}") from None
        if not content:
            raise ConfigError(f"{file_var}: {path!r} is empty")
        return content
    return direct or None


def load_settings(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings. ``flags`` maps option names to values given on the
    command line (``None`` = not given). Raises :class:`ConfigError` naming
    the variable (or flag) that is wrong."""
    env = os.environ if environ is None else environ
    flags = flags or {}
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        flag_value = flags.get(opt.name) if opt.flag else None
        if flag_value is not None:
            values[opt.name] = _convert(opt, flag_value, opt.flag_name)
            continue
        if opt.secret:
            raw = _read_secret(opt, env)
            values[opt.name] = raw
            continue
        raw = env.get(opt.env)
        if raw is not None and raw.strip() != "":
            values[opt.name] = _convert(opt, raw, opt.env)
        else:
            values[opt.name] = opt.default
    if values["lock_file"] is None:
        values["lock_file"] = default_lock_file()
    provider = values["provider"]
    if provider is not None:
        values["provider"] = provider.lower()
    return Settings(**values)


def validate_provider_name(name: str | None, known: tuple[str, ...]) -> None:
    if name is not None and name not in known:
        raise ConfigError(f"COLA_PROVIDER: unknown provider {name!r} (known: {', '.join(known)})")


# Test-only, and deliberately not a setting: no flag, not in ``Settings`` nor in
# ``--help``. The crash-point tests set it (worker/faults.py); it is read here
# so that this module stays the only one that reads the environment.
CRASH_HOOK_ENV = "COLA_TEST_CRASH_AT"


def crash_hook_spec(environ: Mapping[str, str] | None = None) -> str | None:
    """The value of ``COLA_TEST_CRASH_AT``, or None when it is unset or empty."""
    env = os.environ if environ is None else environ
    raw = env.get(CRASH_HOOK_ENV, "").strip()
    return raw or None
