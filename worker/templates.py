"""The optional templates file (``COLA_TEMPLATES_FILE``): the WhatsApp
templates the sender has, so that ``enqueue`` refuses an unknown template or a
wrong parameter count before anything is queued.

The file is YAML or JSON (``.json`` is read as JSON, anything else as YAML,
which also reads JSON): a list of entries, or a mapping whose ``templates``
key holds the list. Each entry::

    - name: recordatorio_cita   # as approved at the provider
      language: es_PE
      parameters: 2             # how many body parameters it takes

Without the file nothing is checked here: the provider refuses a bad template
at send time and the row ends in ``error`` (a permanent answer).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.errors import ConfigError

SOURCE = "COLA_TEMPLATES_FILE"
KEYS = ("name", "language", "parameters")


@dataclass(frozen=True)
class Templates:
    path: str
    params: dict[tuple[str, str], int]  # (name, language) -> parameter count

    def problem(self, name: str, language: str, given: int) -> tuple[str, str] | None:
        """``(field, reason)`` when this template use is wrong, else None."""
        count = self.params.get((name, language))
        if count is None:
            languages = sorted(lang for (n, lang) in self.params if n == name)
            if languages:
                return (
                    "idioma",
                    f"template {name!r} has no language {language!r} in {self.path} "
                    f"(it has: {', '.join(languages)})",
                )
            return "plantilla", f"unknown template {name!r} (not in {self.path})"
        if given != count:
            return (
                "parametros",
                f"template {name!r} ({language}) takes {count} parameter(s), {given} given",
            )
        return None


def load(path: str) -> Templates:
    """Read and check the file; :class:`ConfigError` (exit 2) names the file
    and the entry that is wrong."""
    from worker.importer import LANGUAGE_RE, TEMPLATE_RE

    where = f"{SOURCE} {path!r}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    data = _parse(text, path, where)
    if isinstance(data, dict) and "templates" in data:
        data = data["templates"]
    if not isinstance(data, list):
        raise ConfigError(f"{where}: expected a list of templates (name, language, parameters)")
    params: dict[tuple[str, str], int] = {}
    for n, entry in enumerate(data, start=1):
        label = f"{where}: entry {n}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{label}: expected a mapping with {', '.join(KEYS)}")
        name = entry.get("name")
        if isinstance(name, str):
            label += f" ({name!r})"
        extra = sorted(str(k) for k in entry if k not in KEYS)
        if extra:
            raise ConfigError(f"{label}: unknown key {extra[0]!r} (known: {', '.join(KEYS)})")
        if not isinstance(name, str) or not TEMPLATE_RE.match(name):
            raise ConfigError(f"{label}: name: required, 1-512 characters of a-z, 0-9 and _")
        language = entry.get("language")
        if not isinstance(language, str) or not LANGUAGE_RE.match(language):
            raise ConfigError(f"{label}: language: required, a code like es, es_PE or en_US")
        count = entry.get("parameters", None)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"{label}: parameters: required, a whole number 0 or more")
        if (name, language) in params:
            raise ConfigError(f"{label}: {name!r} in {language} is listed twice")
        params[(name, language)] = count
    return Templates(path=path, params=params)


def _parse(text: str, path: str, where: str) -> Any:
    if path.lower().endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON: line {exc.lineno}: {exc.msg}") from None
    import yaml  # type: ignore[import-untyped]  # no stubs in the dev dependencies

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {at}{problem}") from None


def check(messages: Sequence[Any], templates: Templates) -> tuple[list[Any], list[tuple[int, str, str]]]:
    """Split validated messages into the good ones and ``(line, field, reason)``
    for each template message the file does not allow."""
    good: list[Any] = []
    bad: list[tuple[int, str, str]] = []
    for m in messages:
        if m.tipo != "template":
            good.append(m)
            continue
        content = json.loads(m.payload)
        wrong = templates.problem(content["template"], content["language"], len(content["params"]))
        if wrong is None:
            good.append(m)
        else:
            bad.append((m.line, *wrong))
    return good, bad
