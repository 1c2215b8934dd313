"""`worker.enqueue(...)`: the Python API for programs, on every backend."""

from __future__ import annotations

import pytest
from support import states

import worker
from worker.errors import InputError


def test_worker_enqueue_is_the_function(db_url: str) -> None:
    messages = [
        {"telefono": "+51987654321", "cliente_nombre": "Ana", "mensaje": "Hola Ana"},
        {"telefono": "+51987654322", "plantilla": "recordatorio", "idioma": "es_PE", "parametros": ["10:00"]},
    ]
    result = worker.enqueue("api", messages, database_url=db_url)
    assert (result.inserted, result.already_queued, len(result.invalid)) == (2, 0, 0)
    again = worker.enqueue("api", messages, database_url=db_url)
    assert (again.inserted, again.already_queued) == (0, 2)
    assert states(db_url)["pendiente"] == 2
    with pytest.raises(InputError, match="telefono"):
        worker.enqueue("api", [{"telefono": "12", "mensaje": "x"}], database_url=db_url)
    assert states(db_url)["pendiente"] == 2
