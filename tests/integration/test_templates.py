"""`COLA_TEMPLATES_FILE`: enqueue refuses unknown templates and wrong parameter
counts before anything is queued; a bad file exits 2 naming it and the entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import execute, rows, run_worker, scalar, worker_env

TEMPLATES_YAML = """\
# the templates approved at the provider
- name: recordatorio_cita
  language: es_PE
  parameters: 2
- name: aviso_pago
  language: es_PE
  parameters: 0
"""

# Line 1 is the header. Line 3: unknown template; 4: wrong count; 5: a language
# the template does not have; 2, 6 and 7 are fine.
CSV = """\
telefono,mensaje,plantilla,idioma,parametros
+51987650001,,recordatorio_cita,es_PE,Ana|lunes 10:00
+51987650002,,recordatorio,es_PE,Bob|martes
+51987650003,,recordatorio_cita,es_PE,Carla
+51987650004,,recordatorio_cita,en_US,Dan|Monday
+51987650005,,aviso_pago,es_PE,
+51987650006,hola,,,
"""


def _files(tmp_path: Path) -> tuple[Path, Path]:
    templates = tmp_path / "templates.yaml"
    templates.write_text(TEMPLATES_YAML, encoding="utf-8")
    csv = tmp_path / "in.csv"
    csv.write_text(CSV, encoding="utf-8")
    return templates, csv


def _queued(url: str) -> list[str]:
    return sorted(r["telefono"] for r in rows(url).values())


def test_unknown_templates_and_wrong_counts_are_refused_naming_the_line(db_url: str, tmp_path: Path) -> None:
    templates, csv = _files(tmp_path)
    # Without the file: queued as before (the provider would refuse them at send time).
    free = run_worker(worker_env(db_url, tmp_path), "enqueue", "--session", "free", "--csv", str(csv))
    assert free.returncode == 0, free.stderr
    assert len(rows(db_url)) == 6
    for table in ("cola_envios", "sesiones_envio"):
        execute(db_url, f"DELETE FROM {table}")

    env = worker_env(db_url, tmp_path, templates_file=templates)
    refused = run_worker(env, "enqueue", "--session", "checked", "--csv", str(csv))
    assert refused.returncode == 2, refused.stderr
    err = refused.stderr
    assert f"line 3: plantilla: unknown template 'recordatorio' (not in {templates})" in err
    assert "line 4: parametros: template 'recordatorio_cita' (es_PE) takes 2 parameter(s), 1 given" in err
    assert "line 5: idioma: template 'recordatorio_cita' has no language 'en_US'" in err
    assert "line 2" not in err and "line 6" not in err and "line 7" not in err
    assert "Traceback" not in err
    assert rows(db_url) == {} and scalar(db_url, "SELECT COUNT(*) FROM sesiones_envio") == 0

    args = ("enqueue", "--session", "checked", "--csv", str(csv))
    skipped = run_worker(env, *args, "--skip-invalid", "--json")
    assert skipped.returncode == 0, skipped.stderr
    out = json.loads(skipped.stdout)
    assert out["inserted"] == 3 and [e["line"] for e in out["invalid"]] == [3, 4, 5]
    assert _queued(db_url) == ["+51987650001", "+51987650005", "+51987650006"]


def test_a_json_templates_file_and_one_message_mode(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "templates.json"
    path.write_text(
        json.dumps({"templates": [{"name": "codigo", "language": "es", "parameters": 1}]}), encoding="utf-8"
    )
    env = worker_env(db_url, tmp_path)
    one = ["enqueue", "--session", "s", "--to", "+51987650001", "--template", "codigo", "--lang", "es"]
    wrong = run_worker(env, *one, "--templates-file", str(path))  # the flag beats the environment
    assert wrong.returncode == 2
    assert "--param: template 'codigo' (es) takes 1 parameter(s), 0 given" in wrong.stderr
    assert rows(db_url) == {}
    ok = run_worker(worker_env(db_url, tmp_path, templates_file=path), *one, "--param", "4417")
    assert ok.returncode == 0, ok.stderr
    assert [json.loads(r["payload"])["params"] for r in rows(db_url).values()] == [["4417"]]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("t.yaml", "- name: a\n  language: es\n", "entry 1 ('a'): parameters: required"),
        ("t.yaml", "- {name: a, language: es, parameters: 1}\n- {name: b, language: es, parameters: -1}\n",
         "entry 2 ('b'): parameters: required, a whole number 0 or more"),
        ("t.yaml", "- {name: a, language: es, parameters: 1}\n- {name: a, language: es, parameters: 2}\n",
         "entry 2 ('a'): 'a' in es is listed twice"),
        ("t.yaml", "- {name: Aviso, language: es, parameters: 1}\n", "entry 1 ('Aviso'): name:"),
        ("t.yaml", "- name: a\n  lang: es\n  parameters: 1\n", "entry 1 ('a'): unknown key 'lang'"),
        ("t.yaml", "name: a\n", "expected a list of templates"),
        ("t.yaml", "- name: [a\n", "not valid YAML: line"),
        ("t.json", '[{"name": "a", "language": "es", "parameters": 1},]', "not valid JSON: line 1"),
        ("missing.yaml", None, "cannot read it"),
    ],
)  # fmt: skip
def test_a_bad_templates_file_exits_2_naming_the_file_and_the_entry(
    sqlite_db_url: str, tmp_path: Path, name: str, content: str | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    env = worker_env(sqlite_db_url, tmp_path, templates_file=path)
    proc = run_worker(env, "enqueue", "--session", "s", "--to", "+51987650001", "--text", "hola")
    assert proc.returncode == 2, proc.stderr
    assert f"COLA_TEMPLATES_FILE '{path}'" in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert rows(sqlite_db_url) == {}
