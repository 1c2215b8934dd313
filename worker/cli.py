"""The `cola-worker` command.

The file lock is tried before any heavy import (SQLAlchemy, httpx): a second
`run` on the same host exits 0 in a few tens of milliseconds, naming the
holder. Every option has an environment variable, named in `--help`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from worker import lock as file_lock
from worker.errors import ColaError, UsageError
from worker.settings import OPTIONS, OPTIONS_BY_NAME, Settings, load_settings

# Which settings each command takes as flags (all have COLA_* variables).
_PRUNE_ONLY = ("keep_keys_days",)
# Settings of `receipts` alone (the run reads COLA_RECEIPTS_PUBLIC_URL from the environment only).
_RECEIPTS_ONLY = (
    "receipts_host",
    "receipts_port",
    "receipts_public_url",
    "receipts_max_body",
    "receipt_window",
    "receipt_sweep",
    "opt_out_words",
)
_ENQUEUE_ONLY = ("templates_file",)
_RUN_OPTIONS = tuple(
    o.name for o in OPTIONS if o.flag and o.name not in (*_PRUNE_ONLY, *_RECEIPTS_ONLY, *_ENQUEUE_ONLY)
)
_COMMON = ("log_format", "log_level")
_COMMAND_OPTIONS: dict[str, tuple[str, ...]] = {
    "run": _RUN_OPTIONS,
    "enqueue": (*_COMMON, "default_region", "max_attempts", "templates_file"),
    "status": (*_COMMON, "lease_seconds", "lock_file", "receipt_window"),
    "audit": (*_COMMON, "receipt_window"),
    "requeue": _COMMON,
    "cancel": _COMMON,
    "resolve": _COMMON,
    "pause": _COMMON,
    "resume": _COMMON,
    "recover": (*_COMMON, "lease_seconds"),
    "prune": (*_COMMON, *_PRUNE_ONLY),
    "lock": ("lock_file",),
    "db": _COMMON,
    "demo": _COMMON,
    # --host and --port are added by hand (receipts_host, receipts_port).
    "receipts": (*_COMMON, *_RECEIPTS_ONLY[2:]),
}


def _add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    group = parser.add_argument_group("settings (flag > environment > default)")
    for name in names:
        opt = OPTIONS_BY_NAME[name]
        default = "" if opt.default is None else f", default {opt.default}"
        kwargs: dict[str, Any] = {
            "dest": f"opt_{name}",
            "default": None,
            "help": f"{opt.help} [env {opt.env}{default}]",
            "metavar": name.upper() if opt.kind != "choice" else None,
        }
        if opt.choices:
            kwargs["choices"] = opt.choices
            kwargs.pop("metavar")
        group.add_argument(opt.flag_name, **kwargs)


def _secrets_epilog() -> str:
    names = [o.env for o in OPTIONS if o.secret]
    return "secrets and the database URL are read only from the environment (or X_FILE): " + ", ".join(names)


class _VersionAction(argparse.Action):
    """``--version``: the version is read from the package metadata only when
    asked for, not each time the parser is built (the lock fast path)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        from worker import version

        print(f"{parser.prog} {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cola-worker",
        description="Send WhatsApp messages queued in the cola_envios table, each exactly once.",
        epilog=_secrets_epilog(),
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the installed version (package metadata) and exit"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_secrets_epilog())
        if name in _COMMAND_OPTIONS:
            _add_setting_flags(p, _COMMAND_OPTIONS[name])
        return p

    p = add("run", "one run: lock, recover, claim in batches, send, record, exit")
    p.add_argument("--session", help="only this session (name)")
    p.add_argument("--dry-run", action="store_true", help="show what would be sent; claim and write nothing")
    p.add_argument("--loop", action="store_true", help="stay up and poll; serve /metrics and /healthz")

    p = add("enqueue", "queue messages from a CSV/JSON Lines file or from flags")
    p.add_argument("--session", required=True, help="session (batch) name; created if missing")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--csv", metavar="FILE", help="CSV file with a header row ('-' = stdin)")
    src.add_argument("--jsonl", metavar="FILE", help="JSON Lines file ('-' = stdin)")
    src.add_argument("--to", metavar="PHONE", help="one message: the recipient")
    p.add_argument("--text", help="one message: the text")
    p.add_argument("--customer-id", dest="customer_id")
    p.add_argument("--name", help="one message: customer display name")
    p.add_argument("--template", help="one message: template name")
    p.add_argument("--lang", help="one message: template language (e.g. es_PE)")
    p.add_argument("--param", action="append", help="one message: template parameter (repeatable)")
    p.add_argument("--send-after", dest="send_after", metavar="ISO8601", help="not before this time")
    p.add_argument("--expires", metavar="ISO8601", help="cancel instead of sending after this time")
    p.add_argument("--key", help="dedupe key")
    p.add_argument("--skip-invalid", action="store_true", help="insert the valid rows, report the others")
    p.add_argument("--json", action="store_true", help="machine output on stdout")

    p = add("status", "counts by state per session, oldest pending age, live runs, lock holder")
    p.add_argument("--session")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS", help="refresh every N s")

    p = add("audit", "duplicate audit and consistency checks (exit 5 when something is found)")
    p.add_argument("--hours", type=float, default=24.0, help="window, hours (default 24)")
    p.add_argument("--json", action="store_true")

    for name, text in (
        ("requeue", "put rows back to pendiente (incierto needs --accept-duplicate-risk)"),
        ("cancel", "cancel rows that are not final"),
    ):
        p = add(name, text)
        p.add_argument("--id", dest="ids", type=int, action="append", help="row id (repeatable)")
        p.add_argument("--session")
        p.add_argument("--state", help="only rows in this state (requeue: error or incierto)")
        if name == "requeue":
            p.add_argument("--accept-duplicate-risk", action="store_true", dest="accept_duplicate_risk")
        p.add_argument("--json", action="store_true")
    p = add(
        "resolve",
        "settle incierto rows by hand: --sent records the send (nothing is sent), --not-sent requeues",
    )
    p.add_argument("--id", dest="ids", type=int, action="append", help="row id (repeatable)")
    p.add_argument("--session", help="the session's incierto rows (narrow with the filters below)")
    outcome = p.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--sent", action="store_true", help="the message was delivered: mark it enviado")
    outcome.add_argument(
        "--not-sent", action="store_false", dest="sent", help="it was not: back to pendiente, due now"
    )
    p.add_argument("--provider-id", dest="provider_id", help="with --sent: the provider's message id")
    p.add_argument(
        "--accept-duplicate-risk",
        action="store_true",
        dest="accept_duplicate_risk",
        help="with --not-sent: also rows a dying run left incierto (they may have been delivered)",
    )
    p.add_argument("--reason", help="why (kept in the journal with your user name)")
    p.add_argument("--by", help="who decided, if not the OS user running this")
    p.add_argument(
        "--older-than-minutes",
        type=float,
        dest="older_than_minutes",
        help="with --session: only rows incierto for at least M minutes",
    )
    p.add_argument("--error-code", dest="error_code", help="with --session: only rows with this error code")
    p.add_argument("--json", action="store_true")
    for name, text in (("pause", "pause a session"), ("resume", "resume a paused session")):
        p = add(name, text)
        p.add_argument("--session", required=True)

    p = add("show", "one row's history (--id N), or a session's rows in a state")
    p.add_argument("--id", type=int, help="the row (job) id")
    p.add_argument("--session", help="list this session's rows")
    p.add_argument("--state", help="with --session: only rows in this state (e.g. error)")
    p.add_argument(
        "--limit", type=int, default=50, help="with --session: at most this many rows (default 50)"
    )
    p.add_argument("--json", action="store_true")

    p = add("recover", "recover rows of dead runs now (every run also does it first)")
    p.add_argument("--json", action="store_true")

    p = add(
        "prune",
        "delete enviado/error/cancelado rows older than an age, in small batches; incierto rows stay; "
        "the dedupe keys of pruned rows are kept for --keep-keys-days",
    )
    p.add_argument("--older-than-days", type=float, required=True, dest="older_than_days")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted; write nothing")
    p.add_argument("--json", action="store_true")

    p = add("lock", "the file lock")
    lock_sub = p.add_subparsers(dest="lock_command", required=True)
    lock_sub.add_parser("status", help="who holds the lock")
    lock_sub.add_parser("release", help="remove the lock file if no process holds it")

    p = add("db", "schema migrations (Alembic)")
    db_sub = p.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="migrate to the latest revision")
    up.add_argument("revision", nargs="?", default="head")
    db_sub.add_parser("current", help="show the current revision and the latest")

    # The sandbox parses its own flags (`cola-worker fake-provider --help`),
    # so its module is not imported on the lock fast path.
    p = sub.add_parser(
        "fake-provider",
        help="local sandbox speaking the Meta Cloud API shape (see fake-provider --help)",
        add_help=False,
    )
    p.add_argument("sandbox_argv", nargs=argparse.REMAINDER)

    # Like fake-provider, these pass the rest of the line to a command of their own.
    # (worker.scheduler is not imported here: the lock fast path stays light.)
    for name, text in (
        ("schedule", "container entrypoint: start `run` every minute, forward SIGTERM so a stop drains"),
        ("cron", "wrap a command for host cron: output to --log-file, printed only when it fails"),
    ):
        p = sub.add_parser(name, help=f"{text} (see {name} --help)", add_help=False)
        p.add_argument("passed_argv", nargs=argparse.REMAINDER)

    p = add(
        "receipts", "serve provider status callbacks: track delivery, settle incierto rows, opt-out words"
    )
    p.add_argument(
        "--host",
        dest="opt_receipts_host",
        default=None,
        help="address to listen on [env COLA_RECEIPTS_HOST, default 127.0.0.1]",
    )
    p.add_argument(
        "--port",
        dest="opt_receipts_port",
        default=None,
        help="port (0: a free one) [env COLA_RECEIPTS_PORT, default 8766]",
    )

    p = add("demo", "the whole story on an embedded SQLite database and the local sandbox")
    p.add_argument("--dir", help="working directory (default: a new temporary one)")
    p.add_argument("--messages", type=int, default=120)
    p.add_argument(
        "--database-url",
        dest="database_url",
        help="run the story on this EMPTY MariaDB/MySQL or PostgreSQL database instead of SQLite "
        "(a scratch database: the URL is visible to ps, so use one without a real password)",
    )
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_")}


def _configure_logging(settings: Settings) -> None:
    from worker.logs import configure

    configure(settings.log_format, settings.log_level)


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    held: file_lock.FileLock | None = None
    if not args.dry_run:
        got = file_lock.acquire(settings.lock_file, settings.lock_timeout)
        if isinstance(got, file_lock.Holder):
            print(
                f"cola-worker: another run holds the lock {settings.lock_file} ({got.describe()}); exiting",
                file=sys.stderr,
            )
            return 0
        held = got
    try:
        _configure_logging(settings)
        from worker.runner import command_run  # heavy imports only after the lock

        return command_run(args, settings)
    finally:
        if held is not None:
            held.release()


def _cmd_lock(args: argparse.Namespace, settings: Settings) -> int:
    path = settings.lock_file
    if args.lock_command == "status":
        held, holder = file_lock.status(path)
        if held and holder is not None:
            print(f"{path}: held by {holder.describe()}")
        elif os_path_exists(path):
            print(f"{path}: free (last holder: {holder.describe() if holder else 'unknown'})")
        else:
            print(f"{path}: free (no lock file)")
        return 0
    removed = file_lock.release_stale(path)
    print(f"{path}: {'removed (no process held it)' if removed else 'no lock file'}")
    return 0


def os_path_exists(path: str) -> bool:
    import os

    return os.path.lexists(path)


def _cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from worker import db

    engine = db.create_engine_from_settings(settings)
    try:
        if args.db_command == "upgrade":
            try:
                db.upgrade(engine, args.revision)
            except Exception as exc:
                raise db.translate_error(exc) from exc
            with engine.connect() as conn:
                print(f"schema at {db.current_revision(conn)}")
            return 0
        try:
            with engine.connect() as conn:
                current = db.current_revision(conn)
        except Exception as exc:
            raise db.translate_error(exc) from exc
        head = db.head_revision()
        state = "up to date" if current == head else "behind: run `cola-worker db upgrade`"
        print(f"current: {current or 'none'}\nlatest:  {head}\n{state}")
        return 0
    finally:
        engine.dispose()


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace, Settings], int]:
    def call(args: argparse.Namespace, settings: Settings) -> int:
        import importlib

        _configure_logging(settings)
        fn = getattr(importlib.import_module(module), function)
        result = fn(args, settings)
        return int(result)

    return call


_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "run": _cmd_run,
    "lock": _cmd_lock,
    "db": _cmd_db,
    "enqueue": _lazy("worker.importer", "command_enqueue"),
    "status": _lazy("worker.status", "command_status"),
    "audit": _lazy("worker.audit", "command_audit"),
    "requeue": _lazy("worker.operator", "command_requeue"),
    "cancel": _lazy("worker.operator", "command_cancel"),
    "resolve": _lazy("worker.resolve", "command_resolve"),
    "pause": _lazy("worker.operator", "command_pause"),
    "resume": _lazy("worker.operator", "command_resume"),
    "recover": _lazy("worker.operator", "command_recover"),
    "show": _lazy("worker.show", "command_show"),
    "prune": _lazy("worker.operator", "command_prune"),
    "demo": _lazy("worker.demo", "command_demo"),
    "receipts": _lazy("worker.web.app", "command_receipts"),
}


def _fake_provider(argv: Sequence[str]) -> int:
    from worker import sandbox

    parser = argparse.ArgumentParser(
        prog="cola-worker fake-provider",
        description="A local sandbox speaking the Meta Cloud API shape, with latency and fault injection.",
    )
    sandbox.add_arguments(parser)
    return int(sandbox.main_from_args(parser.parse_args(list(argv))))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["fake-provider"]:
            # Its flags go to the sandbox's own parser (argparse's REMAINDER
            # would not pass options through a subparser).
            return _fake_provider(argv[1:])
        if argv[:1] in (["schedule"], ["cron"]):
            from worker import scheduler

            command = scheduler.command_schedule if argv[0] == "schedule" else scheduler.command_cron
            return command(argv[1:])
        args = build_parser().parse_args(argv)
        settings = load_settings(_flags(args))
        return _COMMANDS[args.command](args, settings)
    except ColaError as exc:
        print(f"cola-worker: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # translate driver errors at the edge
        code, message = _classify_unexpected(exc)
        print(f"cola-worker: {message}", file=sys.stderr)
        return code


def _classify_unexpected(exc: Exception) -> tuple[int, str]:
    if "sqlalchemy" in sys.modules:
        from worker import db

        translated = db.translate_error(exc)
        if isinstance(translated, ColaError):
            return translated.exit_code, str(translated)
    import logging

    first_line = (str(exc).strip().splitlines() or [""])[0]
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        import traceback

        traceback.print_exc()
        hint = ""
    else:
        hint = " (COLA_LOG_LEVEL=DEBUG shows the traceback)"
    return 1, f"unexpected error: {type(exc).__name__}: {first_line}{hint}"


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str, sort_keys=False)
    sys.stdout.write("\n")


def entry() -> None:  # pragma: no cover
    raise SystemExit(main())


__all__ = ["UsageError", "build_parser", "main", "print_json"]
