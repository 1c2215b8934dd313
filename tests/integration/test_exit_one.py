"""Exit 1 (docs/design.md section 6): outcomes that cannot be recorded, an unexpected
error in the middle of a run, and a provider plugin that raises. Each gives
exit 1, one clear message, no traceback unless COLA_LOG_LEVEL=DEBUG, and leaves
no row claimed: unsent rows are pendiente, rows in flight end as G2/G3 say."""

from __future__ import annotations

import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from support import execute, phone, rows, run_worker, scalar, seed, worker_env

from worker.sandbox import SandboxServer

PLUGIN = textwrap.dedent(
    """
    import os

    from worker.providers.base import Provider
    from worker.providers.meta import FakeProvider


    class Raising(Provider):
        '''The sandbox, except that for one recipient it sends and then raises.'''

        name = "raising"

        def __init__(self, inner, bad):
            self.inner, self.bad = inner, bad

        def send(self, request):
            result = self.inner.send(request)
            if request.to == self.bad:
                raise RuntimeError("plugin bug after the request went out")
            return result

        def close(self):
            self.inner.close()


    def make(settings, *, max_connections):
        inner = FakeProvider.from_settings(settings, max_connections=max_connections)
        return Raising(inner, os.environ["RAISING_RECIPIENT"])
    """
)


def _ledger(server: SandboxServer) -> Counter[str]:
    return Counter(e["job_id"] for e in server.ledger())


def _plugin_path(tmp_path: Path) -> Path:
    """An installed distribution offering ``raising`` in the ``cola_worker.providers`` group."""
    site = tmp_path / "site"
    dist = site / "acme_raising_provider-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-raising-provider\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cola_worker.providers]\nraising = acme_raising:make\n")
    (site / "acme_raising.py").write_text(PLUGIN)
    return site


@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
def test_a_provider_that_raises_stops_the_run_exit_1(
    sqlite_db_url: str, tmp_path: Path, sandbox: SandboxServer, log_level: str
) -> None:
    ids = seed(sqlite_db_url, 6)
    env = worker_env(
        sqlite_db_url,
        tmp_path,
        provider="raising",
        fake_base_url=sandbox.base_url,
        concurrency=1,
        log_level=log_level,
    )
    env["PYTHONPATH"] = str(_plugin_path(tmp_path))
    env["RAISING_RECIPIENT"] = phone(1)
    proc = run_worker(env, "run")
    assert proc.returncode == 1, proc.stderr
    what = "provider raising raised RuntimeError: plugin bug after the request went out"
    assert what in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].endswith(f"run 1 failed (exit 1): {what}")
    assert ("Traceback" in proc.stderr) == (log_level == "DEBUG")
    table = rows(sqlite_db_url)
    # The request may have gone out (here it did): incierto, never sent again.
    assert table[ids[1]]["estado"] == "incierto"
    assert table[ids[0]]["estado"] == "enviado"
    # The run stopped at the first raise: the rest went back untouched.
    for i in ids[2:]:
        r = table[i]
        got = (r["estado"], r["intentos"], r["claim_token"], r["ejecucion_id"])
        assert got == ("pendiente", 0, None, None), r
    assert _ledger(sandbox) == Counter({str(ids[0]): 1, str(ids[1]): 1})


def test_an_outcome_that_cannot_be_recorded_exits_1(
    sqlite_db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    ids = seed(sqlite_db_url, 4)
    bad = ids[1]
    # The database refuses to record this one row as sent (every try, every group).
    execute(
        sqlite_db_url,
        "CREATE TRIGGER refuse_record BEFORE UPDATE OF estado ON cola_envios "
        f"WHEN NEW.estado = 'enviado' AND OLD.id = {bad} "
        "BEGIN SELECT RAISE(ABORT, 'disk says no'); END",
    )
    env = worker_env(
        sqlite_db_url, tmp_path, provider="fake", fake_base_url=sandbox.base_url, lease_seconds=2
    )
    proc = run_worker(env, "run")
    assert proc.returncode == 1, proc.stderr
    assert f"could not record the outcome of row {bad}" in proc.stderr
    assert "run 1 failed (exit 1): 1 outcome(s) could not be recorded" in proc.stderr
    assert "Traceback" not in proc.stderr
    table = rows(sqlite_db_url)
    # Accepted but not recorded: it stays enviando, for a recovery (or a replay).
    assert table[bad]["estado"] == "enviando"
    for i in set(ids) - {bad}:  # the others were recorded, or released untouched
        assert table[i]["estado"] in ("enviado", "pendiente"), table[i]
        assert table[i]["estado"] == "enviado" or table[i]["intentos"] == 0
    execute(sqlite_db_url, "DROP TRIGGER refuse_record")
    time.sleep(2.3)  # past the lease
    again = run_worker(env, "run")
    assert again.returncode == 0, again.stderr
    table = rows(sqlite_db_url)
    assert table[bad]["estado"] in ("incierto", "enviado")  # never pendiente: it went out
    assert all(table[i]["estado"] == "enviado" for i in set(ids) - {bad})
    assert _ledger(sandbox) == Counter({str(i): 1 for i in ids})  # nothing sent twice


@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
def test_an_unexpected_error_mid_run_exits_1_and_leaves_nothing_claimed(
    sqlite_db_url: str, tmp_path: Path, sandbox: SandboxServer, log_level: str
) -> None:
    ids = seed(sqlite_db_url, 8)
    # The second claim fails with an error nobody expects.
    execute(
        sqlite_db_url,
        "CREATE TRIGGER second_claim_fails BEFORE UPDATE OF estado ON cola_envios "
        "WHEN NEW.estado = 'procesando' "
        "AND (SELECT COUNT(*) FROM cola_envios WHERE estado <> 'pendiente') >= 3 "
        "BEGIN SELECT RAISE(ABORT, 'unexpected trouble'); END",
    )
    env = worker_env(
        sqlite_db_url,
        tmp_path,
        provider="fake",
        fake_base_url=sandbox.base_url,
        concurrency=1,
        log_level=log_level,
    )
    proc = run_worker(env, "run", "--batch-size", "3")
    assert proc.returncode == 1, proc.stderr
    assert "unexpected error" in proc.stderr and "unexpected trouble" in proc.stderr
    assert ("Traceback" in proc.stderr) == (log_level == "DEBUG")
    table = rows(sqlite_db_url)
    assert [table[i]["estado"] for i in ids[:3]] == ["enviado"] * 3  # in flight: finished and recorded
    for i in ids[3:]:
        r = table[i]
        assert (r["estado"], r["intentos"], r["claim_token"]) == ("pendiente", 0, None)
    assert scalar(sqlite_db_url, "SELECT estado FROM ejecuciones") == "fallida"
    assert _ledger(sandbox) == Counter({str(i): 1 for i in ids[:3]})
