"""`cola-worker enqueue` as an operator runs it: the installed command, a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from worker import db
from worker.schema import cola_envios, sesiones_envio


def cola_worker() -> list[str]:
    exe = Path(sys.executable).parent / "cola-worker"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("cola-worker")
    return [found] if found else [sys.executable, "-m", "worker"]


def run(
    db_url: str, tmp_path: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    base.update({"COLA_DATABASE_URL": db_url, "COLA_LOCK_FILE": str(tmp_path / "lock" / "cola.lock")})
    base.update(env or {})
    return subprocess.run(
        [*cola_worker(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=base,
        timeout=120,
        check=False,
    )


def count(db_url: str, table: sa.Table) -> int:
    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
    finally:
        engine.dispose()


CSV = (
    "cliente_id,cliente_nombre,telefono,mensaje\n"
    'c1,Ana,+51987654321,"Hola Ana,\nsu cita es mañana a las 10:00"\n'
    "c2,Bob,+51987654322,Hola Bob\n"
    "c3,Cy,+51987654323,Hola Cy\n"
)


def test_enqueue_csv_then_the_same_file_again(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text(CSV, encoding="utf-8")
    first = run(db_url, tmp_path, "enqueue", "--session", "recordatorios", "--csv", str(path))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "inserted 3, already queued 0, invalid 0"
    second = run(db_url, tmp_path, "enqueue", "--session", "recordatorios", "--csv", str(path))
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "inserted 0, already queued 3, invalid 0"
    assert count(db_url, cola_envios) == 3


def test_bad_file_exits_2_names_every_bad_line_and_writes_nothing(db_url: str, tmp_path: Path) -> None:
    bad = CSV + (
        "c4,Di,987654324,sin prefijo\n"  # line 6: no +country code, no region
        "c5,Ed,+51987654325,\n"  # line 7: no content
        f"c6,Fa,+51987654326,{'x' * 4097}\n"  # line 8: too long
        "c7,Gi,+51987654327\n"  # line 9: malformed row
    )
    path = tmp_path / "bad.csv"
    path.write_text(bad, encoding="utf-8")
    result = run(db_url, tmp_path, "enqueue", "--session", "s", "--csv", str(path))
    assert result.returncode == 2
    err = result.stderr
    assert "line 6: telefono:" in err and "COLA_DEFAULT_REGION" in err
    assert "line 7: mensaje: one of mensaje or plantilla is required" in err
    assert "line 8: mensaje: longer than 4096" in err
    assert "line 9: (row): 3 fields, but the header has 4" in err
    assert "nothing was written" in err
    assert count(db_url, cola_envios) == 0
    assert count(db_url, sesiones_envio) == 0


def test_unknown_column_is_line_1(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "cols.csv"
    path.write_text("telefono,mensaje,color\n+51987654321,a,rojo\n", encoding="utf-8")
    result = run(db_url, tmp_path, "enqueue", "--session", "s", "--csv", str(path))
    assert result.returncode == 2
    assert "line 1: color: unknown column" in result.stderr


def test_skip_invalid_inserts_the_rest_and_exits_0(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "mixed.csv"
    path.write_text(CSV + "c4,Di,+51 12,hola\n", encoding="utf-8")
    result = run(db_url, tmp_path, "enqueue", "--session", "s", "--csv", str(path), "--skip-invalid")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "inserted 3, already queued 0, invalid 1"
    assert lines[1].startswith("line 6: telefono: not a")
    assert count(db_url, cola_envios) == 3


def test_jsonl_from_stdin_with_json_output(db_url: str, tmp_path: Path) -> None:
    body = "Su código es 4417"
    stdin = "\n".join(
        [
            json.dumps({"telefono": "+51987654321", "mensaje": body}),
            "",
            json.dumps(
                {
                    "telefono": "+51987654322",
                    "plantilla": "cita",
                    "idioma": "es_PE",
                    "parametros": ["Ana", "10:00"],
                }
            ),
            json.dumps({"telefono": "+51987654323", "plantilla": "cita"}),  # line 4: no idioma
        ]
    )
    result = run(
        db_url, tmp_path, "enqueue", "--session", "s", "--jsonl", "-", "--json", "--skip-invalid", stdin=stdin
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # stdout is exactly one JSON document
    assert out["inserted"] == 2 and out["already_queued"] == 0
    assert out["invalid"] == [
        {"line": 4, "field": "idioma", "reason": "required with plantilla (e.g. es, es_PE, en_US)"}
    ]
    assert out["session"] == "s"
    # Logs go to stderr and carry neither bodies nor full phone numbers.
    assert body not in result.stderr and "+51987654321" not in result.stderr
    assert count(db_url, cola_envios) == 2


def test_csv_from_stdin(db_url: str, tmp_path: Path) -> None:
    result = run(db_url, tmp_path, "enqueue", "--session", "s", "--csv", "-", stdin=CSV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "inserted 3, already queued 0, invalid 0"
    assert "━" not in result.stderr  # stderr is not a terminal (cron): no progress bar


def test_json_output_of_a_refused_file(db_url: str, tmp_path: Path) -> None:
    stdin = "telefono,mensaje\n+51987654321,a\n,b\n"
    result = run(db_url, tmp_path, "enqueue", "--session", "s", "--csv", "-", "--json", stdin=stdin)
    assert result.returncode == 2
    out = json.loads(result.stdout)
    assert out["written"] is False and out["inserted"] == 0
    assert out["invalid"] == [{"line": 3, "field": "telefono", "reason": "required"}]


def test_one_message_from_flags(db_url: str, tmp_path: Path) -> None:
    args = ["enqueue", "--session", "s", "--to", "987654321", "--text", "hola", "--customer-id", "c9"]
    refused = run(db_url, tmp_path, *args)
    assert refused.returncode == 2
    assert "--to: number without +country code" in refused.stderr
    result = run(db_url, tmp_path, *args, env={"COLA_DEFAULT_REGION": "PE"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "inserted 1, already queued 0, invalid 0"
    again = run(db_url, tmp_path, *args, "--default-region", "PE")
    assert again.stdout.strip() == "inserted 0, already queued 1, invalid 0"
    assert "+51987654321" not in result.stderr + again.stderr
    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.select(cola_envios)).one()
    finally:
        engine.dispose()
    assert (row.telefono, row.cliente_id, row.tipo) == ("+51987654321", "c9", "text")


def test_source_is_required_and_single(db_url: str, tmp_path: Path) -> None:
    none = run(db_url, tmp_path, "enqueue", "--session", "s")
    assert none.returncode == 2 and "exactly one of --csv" in none.stderr
    mixed = run(db_url, tmp_path, "enqueue", "--session", "s", "--csv", "-", "--text", "hola", stdin=CSV)
    assert mixed.returncode == 2 and "--text only with --to" in mixed.stderr
    missing = run(db_url, tmp_path, "enqueue", "--session", "s", "--csv", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "cannot open" in missing.stderr
    assert count(db_url, cola_envios) == 0


def test_progress_bar_only_on_a_terminal(db_url: str, tmp_path: Path) -> None:
    import threading

    rows = "".join(f"c{i},N,+5198{i:07d},hola {i}\n" for i in range(2000))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    env.update({"COLA_DATABASE_URL": db_url, "TERM": "xterm", "COLUMNS": "100"})
    master, slave = os.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [*cola_worker(), "enqueue", "--session", "tty", "--csv", "-"],
            input=("cliente_id,cliente_nombre,telefono,mensaje\n" + rows).encode(),
            stdout=subprocess.PIPE,
            stderr=slave,
            env=env,
            timeout=120,
            check=False,
        )
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert proc.returncode == 0
    assert proc.stdout.decode().strip() == "inserted 2000, already queued 0, invalid 0"
    terminal = b"".join(chunks).decode(errors="replace")
    assert "2000/2000" in terminal and "━" in terminal  # the bar: "enqueue ━━━━ 2000/2000"
