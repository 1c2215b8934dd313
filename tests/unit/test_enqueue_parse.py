"""Reading and validating enqueue input: no database."""

from __future__ import annotations

import datetime as dt
import io
import json
import sys
from typing import Any

import pytest

from worker import importer as enq
from worker.errors import InputError
from worker.importer import InvalidRow, InvalidRowsError, Message, RawRow, read_csv, read_jsonl, validate_row

NOW = dt.datetime(2025, 3, 1, 12, 0, 0)


def csv_text(text: str) -> io.StringIO:
    return io.StringIO(text, newline="")


def check(
    values: dict[str, Any], *, region: str | None = None, session: str = "s"
) -> Message | list[InvalidRow]:
    return validate_row(RawRow(5, values), session=session, default_region=region, now=NOW)


def ok(values: dict[str, Any], **kw: Any) -> Message:
    result = check(values, **kw)
    assert isinstance(result, Message), result
    return result


def errors(values: dict[str, Any], **kw: Any) -> dict[str, str]:
    result = check(values, **kw)
    assert isinstance(result, list), result
    assert all(e.line == 5 for e in result)
    return {e.field: e.reason for e in result}


# --- CSV --------------------------------------------------------------------


def test_csv_rows_and_physical_line_numbers_with_a_multiline_field() -> None:
    text = (
        "telefono,mensaje,cliente_id\n"  # line 1
        '+51987654321,"hola\nsegunda línea\ntercera",c1\n'  # lines 2-4
        "\n"  # line 5, blank
        "+51987654322,adiós,c2\n"  # line 6
    )
    rows, errs = read_csv(csv_text(text))
    assert errs == []
    assert [r.line for r in rows] == [2, 6]
    assert rows[0].values["mensaje"] == "hola\nsegunda línea\ntercera"
    assert rows[1].values == {"telefono": "+51987654322", "mensaje": "adiós", "cliente_id": "c2"}


def test_csv_bad_row_after_a_multiline_field_names_its_own_line() -> None:
    text = 'telefono,mensaje\n+51987654321,"a\nb\nc"\n+51987654322\n'
    rows, errs = read_csv(csv_text(text))
    assert [r.line for r in rows] == [2]
    assert errs == [InvalidRow(5, "(row)", "1 fields, but the header has 2")]


def test_csv_crlf_line_endings() -> None:
    rows, errs = read_csv(csv_text("telefono,mensaje\r\n+51987654321,a\r\n+51987654322,b\r\n"))
    assert errs == []
    assert [(r.line, r.values["mensaje"]) for r in rows] == [(2, "a"), (3, "b")]


def test_csv_unknown_column_is_an_error_on_line_1() -> None:
    with pytest.raises(InputError, match=r"^line 1: telefonos: unknown column"):
        read_csv(csv_text("telefonos,mensaje\n+51987654321,a\n"))


def test_csv_header_problems() -> None:
    with pytest.raises(InputError, match=r"line 1: telefono: required column missing"):
        read_csv(csv_text("cliente_id,mensaje\nc1,a\n"))
    with pytest.raises(InputError, match=r"line 1: mensaje: a mensaje or a plantilla column is required"):
        read_csv(csv_text("telefono,cliente_id\n+51987654321,c1\n"))
    with pytest.raises(InputError, match=r"line 1: mensaje: column given twice"):
        read_csv(csv_text("telefono,mensaje,mensaje\n"))
    with pytest.raises(InputError, match=r"line 1: header: the file is empty"):
        read_csv(csv_text(""))


def test_csv_header_tolerates_case_spaces_bom_and_semicolons() -> None:
    rows, errs = read_csv(csv_text("\ufeffTelefono ; Mensaje\n+51987654321;hola, mundo\n"))
    assert errs == []
    assert rows[0].values == {"telefono": "+51987654321", "mensaje": "hola, mundo"}


def test_csv_parameters_split_on_pipe_and_empty_cells_are_absent() -> None:
    text = "telefono,plantilla,idioma,parametros,mensaje\n+51987654321,cita,es_PE,Ana|lunes 10:00,\n"
    rows, errs = read_csv(csv_text(text))
    assert errs == []
    assert rows[0].values == {
        "telefono": "+51987654321",
        "plantilla": "cita",
        "idioma": "es_PE",
        "parametros": ["Ana", "lunes 10:00"],
    }


def test_csv_unterminated_quote_is_reported_on_its_line() -> None:
    # csv's strict mode reports a quote problem; without a closing quote the
    # record runs to the end of the file and is reported where it starts.
    rows, errs = read_csv(csv_text('telefono,mensaje\n+51987654321,ok\n+51987654322,"a"b\n'))
    assert [r.line for r in rows] == [2]
    assert len(errs) == 1 and errs[0].line == 3 and errs[0].field == "(row)"
    assert "malformed CSV" in errs[0].reason


def test_csv_too_many_fields() -> None:
    _, errs = read_csv(csv_text("telefono,mensaje\n+51987654321,a,b\n"))
    assert errs == [InvalidRow(2, "(row)", "3 fields, but the header has 2")]


# --- JSON Lines -------------------------------------------------------------


def test_jsonl_lines_blank_lines_and_malformed_json() -> None:
    lines = [
        json.dumps({"telefono": "+51987654321", "mensaje": "a"}),  # 1
        "",  # 2
        "   ",  # 3
        '{"telefono": "+51987654322", "mensaje": ',  # 4 malformed
        json.dumps(["not", "an", "object"]),  # 5
        json.dumps({"telefono": "+51987654323", "plantilla": "x", "idioma": "es", "parametros": ["a"]}),  # 6
    ]
    rows, errs = read_jsonl(io.StringIO("\n".join(lines) + "\n"))
    assert [r.line for r in rows] == [1, 6]
    assert rows[1].values["parametros"] == ["a"]
    assert [(e.line, e.field) for e in errs] == [(4, "(row)"), (5, "(row)")]
    assert "malformed JSON" in errs[0].reason
    assert "expected a JSON object, got list" in errs[1].reason


def test_stdin_dash_reads_standard_input(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b'telefono,mensaje\n+51987654321,"uno\ndos"\n+51987654322,tres\n'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    stream = enq._open_input("-", "--csv")
    rows, errs = read_csv(stream)
    stream.detach()
    assert errs == []
    assert [(r.line, r.values["mensaje"]) for r in rows] == [(2, "uno\ndos"), (4, "tres")]


def test_missing_file_is_an_input_error(tmp_path: Any) -> None:
    with pytest.raises(InputError, match=r"--csv: cannot open .*nope.csv"):
        enq._open_input(str(tmp_path / "nope.csv"), "--csv")


def test_invalid_utf8_is_reported() -> None:
    stream = io.TextIOWrapper(io.BytesIO(b'{"telefono": "\xff"}\n'), encoding="utf-8", newline="")
    rows, errs = read_jsonl(stream)
    assert rows == []
    assert errs[0].line == 1 and "UTF-8" in errs[0].reason


# --- validation -------------------------------------------------------------


def test_valid_text_message() -> None:
    m = ok({"telefono": "+51 987 654 321", "mensaje": "Hola Ana", "cliente_nombre": " Ana "})
    assert m.telefono == "+51987654321"
    assert m.cliente_id == "+51987654321"  # the phone stands in
    assert m.cliente_nombre == "Ana"
    assert m.tipo == "text"
    assert json.loads(m.payload) == {"text": "Hola Ana"}
    assert m.enviar_desde is None and m.enviar_hasta is None
    assert m.clave.startswith("sha256:") and len(m.clave) <= 128


def test_valid_template_message() -> None:
    m = ok(
        {
            "telefono": "+51987654321",
            "plantilla": "recordatorio_cita",
            "idioma": "es_PE",
            "parametros": ["Ana"],
        }
    )
    assert m.tipo == "template"
    assert json.loads(m.payload) == {"template": "recordatorio_cita", "language": "es_PE", "params": ["Ana"]}
    assert ok({"telefono": "+51987654321", "plantilla": "x", "idioma": "es"}).payload == (
        '{"language":"es","params":[],"template":"x"}'
    )


def test_phone_without_plus_needs_a_region() -> None:
    reason = errors({"telefono": "987654321", "mensaje": "a"})["telefono"]
    assert "COLA_DEFAULT_REGION" in reason
    assert ok({"telefono": "987654321", "mensaje": "a"}, region="PE").telefono == "+51987654321"


@pytest.mark.parametrize("phone", ["+51 12", "+1 555 000 0000", "hello", "+999123456789"])
def test_invalid_phone_numbers(phone: str) -> None:
    reason = errors({"telefono": phone, "mensaje": "a"}, region="PE")["telefono"]
    assert reason.startswith("not a")
    assert phone not in reason  # personal data stays out of messages


def test_phone_required_and_typed() -> None:
    assert errors({"mensaje": "a"}) == {"telefono": "required"}
    assert errors({"telefono": "  ", "mensaje": "a"}) == {"telefono": "required"}
    assert errors({"telefono": ["+51987654321"], "mensaje": "a"}) == {
        "telefono": "must be a string, got list"
    }


def test_text_limits() -> None:
    assert ok({"telefono": "+51987654321", "mensaje": "x" * 4096}).tipo == "text"
    assert "longer than 4096" in errors({"telefono": "+51987654321", "mensaje": "x" * 4097})["mensaje"]
    assert errors({"telefono": "+51987654321", "mensaje": " \n "}) == {"mensaje": "empty"}


def test_text_or_template_not_both_not_neither() -> None:
    both = errors({"telefono": "+51987654321", "mensaje": "a", "plantilla": "x", "idioma": "es"})
    assert both == {"mensaje": "give either mensaje or plantilla, not both"}
    assert errors({"telefono": "+51987654321"}) == {"mensaje": "one of mensaje or plantilla is required"}
    assert errors({"telefono": "+51987654321", "mensaje": "a", "idioma": "es"}) == {
        "idioma": "only with plantilla"
    }


@pytest.mark.parametrize("name", ["Cita", "cita-1", "", "x" * 513, "cita "])
def test_template_names(name: str) -> None:
    result = check({"telefono": "+51987654321", "plantilla": name, "idioma": "es"})
    if name == "cita ":  # surrounding spaces are trimmed
        assert isinstance(result, Message)
        return
    assert isinstance(result, list)
    assert {e.field for e in result} == {"plantilla"}


@pytest.mark.parametrize(
    ("lang", "good"),
    [
        ("es", True),
        ("es_PE", True),
        ("en_US", True),
        ("fil", True),
        ("ES", False),
        ("es-PE", False),
        ("es_pe", False),
        ("", False),
    ],
)
def test_language_codes(lang: str, good: bool) -> None:
    result = check({"telefono": "+51987654321", "plantilla": "cita", "idioma": lang})
    assert isinstance(result, Message) is good
    if not good:
        assert isinstance(result, list) and result[0].field == "idioma"


def test_template_needs_a_language() -> None:
    assert "required with plantilla" in errors({"telefono": "+51987654321", "plantilla": "cita"})["idioma"]


@pytest.mark.parametrize("params", ["a|b", [1, 2], ["a", None], {"a": 1}, ["a", " "]])
def test_parameters_must_be_a_list_of_non_empty_strings(params: Any) -> None:
    errs = errors({"telefono": "+51987654321", "plantilla": "cita", "idioma": "es", "parametros": params})
    assert set(errs) == {"parametros"}


def test_field_lengths() -> None:
    base = {"telefono": "+51987654321", "mensaje": "a"}
    assert ok({**base, "cliente_id": "c" * 64}).cliente_id == "c" * 64
    assert "longer than 64" in errors({**base, "cliente_id": "c" * 65})["cliente_id"]
    assert "longer than 200" in errors({**base, "cliente_nombre": "n" * 201})["cliente_nombre"]
    assert ok({**base, "clave": "k" * 128}).clave == "k" * 128
    assert "longer than 128" in errors({**base, "clave": "k" * 129})["clave"]


def test_unknown_field_in_a_mapping() -> None:
    errs = errors({"telefono": "+51987654321", "mensaje": "a", "phone": "x"})
    assert set(errs) == {"phone"} and "unknown field" in errs["phone"]


def test_every_problem_of_a_row_is_reported() -> None:
    errs = errors({"telefono": "x", "mensaje": "", "cliente_id": "c" * 65, "enviar_desde": "tomorrow"})
    assert set(errs) == {"telefono", "mensaje", "cliente_id", "enviar_desde"}


def test_dates_are_stored_as_naive_utc() -> None:
    m = ok(
        {
            "telefono": "+51987654321",
            "mensaje": "a",
            "enviar_desde": "2025-03-02T09:00:00-05:00",
            "enviar_hasta": "2025-03-02T20:00:00Z",
        }
    )
    assert m.enviar_desde == dt.datetime(2025, 3, 2, 14, 0)
    assert m.enviar_hasta == dt.datetime(2025, 3, 2, 20, 0)
    naive = ok({"telefono": "+51987654321", "mensaje": "a", "enviar_desde": "2025-03-02 09:00:00.5"})
    assert naive.enviar_desde == dt.datetime(2025, 3, 2, 9, 0, 0, 500000)


def test_date_errors() -> None:
    base = {"telefono": "+51987654321", "mensaje": "a"}
    assert "not an ISO 8601" in errors({**base, "enviar_desde": "02/03/2025"})["enviar_desde"]
    assert "not an ISO 8601" in errors({**base, "enviar_hasta": "2025-13-01"})["enviar_hasta"]
    assert "already past" in errors({**base, "enviar_hasta": "2025-03-01T11:59:59Z"})["enviar_hasta"]
    assert (
        "must be after enviar_desde"
        in errors({**base, "enviar_desde": "2025-03-05T10:00:00", "enviar_hasta": "2025-03-04T10:00:00"})[
            "enviar_hasta"
        ]
    )


def test_derived_key_is_stable_and_depends_on_session_customer_and_content() -> None:
    base = {"telefono": "+51987654321", "mensaje": "a"}
    key = ok(base).clave
    assert ok(dict(base)).clave == key
    assert ok({**base, "telefono": "+51 987-654-321"}).clave == key  # normalised first
    assert ok(base, session="other").clave != key
    assert ok({**base, "mensaje": "b"}).clave != key
    assert ok({**base, "cliente_id": "c1"}).clave != key
    assert ok({**base, "clave": "cita-77"}).clave == "cita-77"


def test_invalid_rows_error_lists_every_line() -> None:
    err = InvalidRowsError([InvalidRow(3, "telefono", "required"), InvalidRow(7, "mensaje", "empty")])
    text = str(err)
    assert "2 invalid row(s); nothing was written" in text
    assert "line 3: telefono: required" in text
    assert "line 7: mensaje: empty" in text
    assert err.exit_code == 2
