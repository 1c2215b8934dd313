"""Configuration: flag > environment > default, conversions, errors that name
the variable (or flag), secrets only from the environment and never printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from worker.cli import _ENQUEUE_ONLY, _PRUNE_ONLY, _RECEIPTS_ONLY, _RUN_OPTIONS, _flags, build_parser
from worker.errors import ConfigError
from worker.settings import OPTIONS, OPTIONS_BY_NAME, Option, Settings, load_settings

PROJECT = Path(__file__).resolve().parents[2]
_EXE = Path(sys.executable).parent / "cola-worker"
CLI = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "worker"]

SECRETS = [o for o in OPTIONS if o.secret]
PLAIN = [o for o in OPTIONS if not o.secret]


def from_cli(argv: list[str], environ: dict[str, str] | None = None) -> Settings:
    """Settings as `cola-worker` builds them from argv and an environment."""
    args = build_parser().parse_args(argv)
    return load_settings(_flags(args), environ or {})


# --- precedence ---------------------------------------------------------------


def test_default_when_nothing_is_set() -> None:
    s = load_settings(environ={})
    for opt in OPTIONS:
        if opt.name == "lock_file":
            continue
        assert getattr(s, opt.name) == opt.default, opt.name


def test_environment_beats_default() -> None:
    s = load_settings(environ={"COLA_CONCURRENCY": "3", "COLA_PAIR_INTERVAL": "1.5"})
    assert s.concurrency == 3 and s.pair_interval == 1.5


def test_flag_beats_environment() -> None:
    s = from_cli(["run", "--concurrency", "7"], {"COLA_CONCURRENCY": "3"})
    assert s.concurrency == 7


def test_flag_beats_default_and_unset_flag_leaves_environment() -> None:
    s = from_cli(["run", "--max-jobs", "0"], {"COLA_RATE_LIMIT": "12"})
    assert s.max_jobs == 0  # 0 is a real value (no limit), not "unset"
    assert s.rate_limit == 12.0
    assert s.concurrency == OPTIONS_BY_NAME["concurrency"].default


@pytest.mark.parametrize("opt", [o for o in OPTIONS if o.flag], ids=lambda o: o.name)
def test_every_flag_has_its_environment_variable_and_flag_wins(opt: Option) -> None:
    env_value, flag_value, expected_env, expected_flag = _two_values(opt)
    assert getattr(load_settings(environ={opt.env: env_value}), opt.name) == expected_env
    command = ["prune", "--older-than-days", "1"] if opt.name in _PRUNE_ONLY else ["run"]
    flag = opt.flag_name
    if opt.name in _RECEIPTS_ONLY:
        command = ["receipts"]
        flag = {"receipts_host": "--host", "receipts_port": "--port"}.get(opt.name, flag)
    if opt.name in _ENQUEUE_ONLY:
        command = ["enqueue", "--session", "s"]
    s = from_cli([*command, flag, flag_value], {opt.env: env_value})
    assert getattr(s, opt.name) == expected_flag


def _two_values(opt: Option) -> tuple[str, str, Any, Any]:
    if opt.kind == "int":
        return "7", "9", 7, 9
    if opt.kind == "float":
        return "2.5", "3.25", 2.5, 3.25
    if opt.kind == "choice":
        assert opt.choices is not None and len(opt.choices) >= 2
        a, b = opt.choices[0], opt.choices[1]
        return a.swapcase(), b, a, b
    if opt.name == "provider":
        return "Meta", "fake", "meta", "fake"
    return "  from-env  ", "from-flag", "from-env", "from-flag"


def test_empty_environment_value_means_default() -> None:
    s = load_settings(environ={"COLA_CONCURRENCY": "  ", "COLA_PROVIDER": "", "COLA_META_BASE_URL": ""})
    assert s.concurrency == OPTIONS_BY_NAME["concurrency"].default == 32
    assert s.provider is None
    assert s.meta_base_url == OPTIONS_BY_NAME["meta_base_url"].default


# --- conversions --------------------------------------------------------------


@pytest.mark.parametrize("opt", PLAIN, ids=lambda o: o.name)
def test_every_option_is_converted_from_its_variable(opt: Option) -> None:
    raw, _, expected, _ = _two_values(opt)
    value = getattr(load_settings(environ={opt.env: raw}), opt.name)
    assert value == expected
    assert type(value) is type(expected)


def test_conversion_types() -> None:
    s = load_settings(
        environ={
            "COLA_MAX_JOBS": " 120 ",
            "COLA_MAX_SECONDS": "90",
            "COLA_LEASE_SECONDS": "1",
            "COLA_RATE_LIMIT": "0.5",
            "COLA_LOG_FORMAT": "JSON",
            "COLA_LOG_LEVEL": "debug",
            "COLA_PROVIDER": " TWILIO ",
            "COLA_LOCK_FILE": "/run/x/cola.lock",
            "COLA_METRICS_PORT": "0",
        }
    )
    assert s.max_jobs == 120 and isinstance(s.max_jobs, int)
    assert s.max_seconds == 90.0 and isinstance(s.max_seconds, float)
    assert s.lease_seconds == 1.0  # any lease of 1 s or more is valid
    assert s.rate_limit == 0.5
    assert s.log_format == "json" and s.log_level == "DEBUG"
    assert s.provider == "twilio"
    assert s.lock_file == "/run/x/cola.lock"
    assert s.metrics_port == 0


# --- invalid values name the variable or the flag -------------------------------


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("COLA_CONCURRENCY", "-1"),
        ("COLA_CONCURRENCY", "0"),
        ("COLA_CONCURRENCY", "abc"),
        ("COLA_CONCURRENCY", "2.5"),
        ("COLA_MAX_JOBS", "-1"),
        ("COLA_LOG_FORMAT", "xml"),
        ("COLA_LOG_LEVEL", "loud"),
        ("COLA_LEASE_SECONDS", "0.5"),
        ("COLA_LEASE_SECONDS", "nan"),
        ("COLA_RATE_LIMIT", "0"),
        ("COLA_PAIR_INTERVAL", "-6"),
        ("COLA_LOCK_TIMEOUT", "soon"),
        ("COLA_MAX_SECONDS", "0"),
    ],
)
def test_invalid_environment_value_names_the_variable(env: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={env: value})
    assert str(info.value).startswith(env + ":")
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--concurrency", "-1"], "--concurrency"),
        (["--concurrency", "abc"], "--concurrency"),
        (["--lease-seconds", "0.5"], "--lease-seconds"),
        (["--lock-timeout", "-1"], "--lock-timeout"),
    ],
)
def test_invalid_flag_value_names_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_cli(["run", *argv], {"COLA_CONCURRENCY": "4"})
    assert str(info.value).startswith(flag + ":")
    assert "COLA_" not in str(info.value)


def test_invalid_environment_is_reported_even_when_a_flag_overrides_another_option() -> None:
    with pytest.raises(ConfigError, match=r"^COLA_MAX_JOBS:"):
        from_cli(["run", "--concurrency", "2"], {"COLA_MAX_JOBS": "many"})


# --- secrets ------------------------------------------------------------------


def test_secrets_have_no_flag() -> None:
    parser = build_parser()
    for opt in SECRETS:
        assert opt.flag is False
        with pytest.raises(SystemExit):
            parser.parse_args(["run", opt.flag_name, "x"])
    # Passing one through the flags mapping is ignored.
    s = load_settings({"meta_token": "from-a-flag", "database_url": "sqlite://"}, {})
    assert s.meta_token is None and s.database_url is None


@pytest.mark.parametrize("opt", SECRETS, ids=lambda o: o.name)
def test_secret_from_environment(opt: Option) -> None:
    assert getattr(load_settings(environ={opt.env: "s3cr3t"}), opt.name) == "s3cr3t"


@pytest.mark.parametrize("opt", SECRETS, ids=lambda o: o.name)
def test_secret_file_is_read_and_stripped(opt: Option, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("  s3cr3t-from-file \n\n")
    s = load_settings(environ={opt.env + "_FILE": str(path)})
    assert getattr(s, opt.name) == "s3cr3t-from-file"


@pytest.mark.parametrize("opt", SECRETS, ids=lambda o: o.name)
def test_secret_and_secret_file_both_set_is_an_error(opt: Option, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("a")
    with pytest.raises(ConfigError) as info:
        load_settings(environ={opt.env: "b", opt.env + "_FILE": str(path)})
    assert opt.env in str(info.value) and opt.env + "_FILE" in str(info.value)


def test_missing_secret_file_names_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"COLA_META_TOKEN_FILE": str(missing)})
    assert str(info.value).startswith("COLA_META_TOKEN_FILE:")


def test_empty_secret_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_text(" \n")
    with pytest.raises(ConfigError, match=r"^COLA_DATABASE_URL_FILE:"):
        load_settings(environ={"COLA_DATABASE_URL_FILE": str(path)})


def test_repr_and_str_never_show_secrets() -> None:
    s = load_settings(
        environ={
            "COLA_DATABASE_URL": "mysql+pymysql://u:hunter2@db/cola",
            "COLA_META_TOKEN": "EAAG-token-xyz",
            "COLA_TWILIO_AUTH_TOKEN": "twilio-secret-1",
            "COLA_WEBHOOK_TOKEN": "hook-secret-2",
            "COLA_PROVIDER": "meta",
        }
    )
    for text in (repr(s), str(s), f"{s}", f"{s!r}"):
        for secret in ("hunter2", "EAAG-token-xyz", "twilio-secret-1", "hook-secret-2", "mysql+pymysql"):
            assert secret not in text
        assert "meta_token='***'" in text or "meta_token=***" in text
        assert "provider='meta'" in text  # the rest is still shown
    assert s.meta_token == "EAAG-token-xyz"  # the value itself is intact


def test_repr_shows_unset_secrets_as_none() -> None:
    assert "meta_token=None" in repr(load_settings(environ={}))


def test_settings_are_frozen() -> None:
    s = load_settings(environ={})
    with pytest.raises(AttributeError):
        s.concurrency = 2  # type: ignore[misc]


def test_nothing_outside_settings_reads_a_variable() -> None:
    # Copying the environment for a child process (demo) is not reading configuration.
    reads = re.compile(r"os\.environ(\.get\b|\[)|os\.getenv\b|environ\.get\(\s*[\"']COLA_")
    offenders = []
    for path in (PROJECT / "worker").rglob("*.py"):
        if path.name == "settings.py":
            continue
        text = path.read_text()
        if reads.search(text):
            offenders.append(path.relative_to(PROJECT).as_posix())
    assert offenders == []


# --- the CLI as a subprocess ----------------------------------------------------


def cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    base.update({"COLA_LOCK_FILE": str(lock_dir / "run.lock"), "COLUMNS": "200", **env})
    return subprocess.run(
        [*CLI, *args], env=base, capture_output=True, text=True, timeout=60, cwd=PROJECT, check=False
    )


def test_cli_negative_concurrency_flag(tmp_path: Path) -> None:
    proc = cli(["run", "--concurrency", "-1"], tmp_path, COLA_DATABASE_URL="sqlite://")
    assert proc.returncode == 2
    assert "--concurrency" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_negative_concurrency_environment(tmp_path: Path) -> None:
    proc = cli(["run"], tmp_path, COLA_CONCURRENCY="-3", COLA_DATABASE_URL="sqlite://")
    assert proc.returncode == 2
    assert "COLA_CONCURRENCY" in proc.stderr and "-3" in proc.stderr


@pytest.mark.parametrize(
    "url",
    ["notaurl:hunter2", "mysql+pymysql//u:hunter2@dbhost/cola", "nope://u:hunter2@dbhost/cola"],
)
def test_cli_bad_database_url_names_the_variable_never_the_value(url: str, tmp_path: Path) -> None:
    proc = cli(["run"], tmp_path, COLA_DATABASE_URL=url, COLA_PROVIDER="fake")
    assert proc.returncode == 2, proc.stderr
    assert "COLA_DATABASE_URL" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_cli_database_url_with_a_bad_port_names_the_variable(tmp_path: Path) -> None:
    proc = cli(["run"], tmp_path, COLA_DATABASE_URL="mysql+pymysql://u:hunter2@dbhost:notaport/cola")
    assert "hunter2" not in proc.stderr + proc.stdout
    assert proc.returncode == 2, proc.stderr
    assert "COLA_DATABASE_URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unknown_provider_names_the_variable(tmp_path: Path, sqlite_db_url: str) -> None:
    proc = cli(["run"], tmp_path, COLA_DATABASE_URL=sqlite_db_url, COLA_PROVIDER="nope")
    assert proc.returncode == 2, proc.stderr
    assert "COLA_PROVIDER" in proc.stderr and "nope" in proc.stderr


def test_cli_missing_secret_file_exits_2(tmp_path: Path) -> None:
    proc = cli(["run"], tmp_path, COLA_DATABASE_URL_FILE=str(tmp_path / "absent"))
    assert proc.returncode == 2
    assert "COLA_DATABASE_URL_FILE" in proc.stderr


def test_run_help_names_every_variable_and_no_secret_value(tmp_path: Path) -> None:
    secrets = {
        "COLA_DATABASE_URL": "mysql+pymysql://u:hunter2@db/cola",
        "COLA_META_TOKEN": "EAAG-help-token",
        "COLA_TWILIO_AUTH_TOKEN": "twilio-help-secret",
        "COLA_WEBHOOK_TOKEN": "hook-help-secret",
    }
    proc = cli(["run", "--help"], tmp_path, **secrets)
    assert proc.returncode == 0
    out = proc.stdout
    for name in _RUN_OPTIONS:
        opt = OPTIONS_BY_NAME[name]
        assert opt.flag_name in out, opt.flag_name
        assert opt.env in out, opt.env
    for opt in SECRETS:
        assert opt.env in out  # named as environment-only
        assert opt.flag_name not in out
    for value in secrets.values():
        assert value not in out + proc.stderr
    assert "hunter2" not in out


def test_every_flagged_option_is_offered_by_run() -> None:
    assert set(_RUN_OPTIONS) == (
        {o.name for o in OPTIONS if o.flag} - set(_PRUNE_ONLY) - set(_RECEIPTS_ONLY) - set(_ENQUEUE_ONLY)
    )
