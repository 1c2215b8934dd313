"""The documentation is self-contained and true about the repository.

A user of the repository has the README and ``docs/`` only: every path and
every module they name must exist, and nothing may point outside the
repository (the design and its guarantees live in ``docs/design.md``)."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
from support import PROJECT

DOCS = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]

# Top-level entries of the repository that a document may name as a path.
TOP_LEVEL = sorted(
    {
        p.split("/", 1)[0]
        for p in subprocess.run(
            ["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True, check=True
        ).stdout.split()
    }
)
TRACKED_NAMES = {
    Path(p).name
    for p in subprocess.run(
        ["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout.split()
}

# "worker/x.py", "tests/unit", "bench/results/*.json", "docs/design.md", "migrations/"...
_ROOTS = "|".join(re.escape(t) for t in TOP_LEVEL if not t.startswith("."))
REPO_PATH = re.compile(rf"(?<![\w./~:@$-])(?:{_ROOTS})/[\w.*/-]*")
# a bare file name in backticks: `settings.py`, `crontab.example`
BARE_FILE = re.compile(r"`([\w-]+\.(?:py|md|toml|ini|yml|yaml|example|cfg|sql))`")
# worker.x.y (not cola_worker.providers, the entry point group)
MODULE = re.compile(r"(?<![\w./-])worker(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"from (worker(?:\.\w+)*) import ([\w, ]+)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _doc_id(path: Path) -> str:
    return path.relative_to(PROJECT).as_posix()


def _find_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:  # the parent is a module, not a package
        return False


def _resolves(dotted: str) -> bool:
    """``worker.a.b.C``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    module = parts[0]
    rest = parts[1:]
    while rest and _find_module(f"{module}.{rest[0]}"):
        module = f"{module}.{rest.pop(0)}"
    obj: object = importlib.import_module(module)
    for name in rest:
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_every_repository_path_named_exists(doc: Path) -> None:
    text = doc.read_text()
    missing = []
    for match in REPO_PATH.finditer(text):
        name = match.group().rstrip(".,:;)")
        if not list(PROJECT.glob(name.rstrip("/"))):
            missing.append(name)
    for match in BARE_FILE.finditer(text):
        if match.group(1) not in TRACKED_NAMES:
            missing.append(match.group(1))
    for match in LINK.finditer(text):
        target = match.group(1)
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (doc.parent / target).exists():
            missing.append(target)
    assert missing == [], f"{_doc_id(doc)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_every_module_named_exists(doc: Path) -> None:
    text = doc.read_text()
    missing = [m.group() for m in MODULE.finditer(text) if not _resolves(m.group().rstrip("."))]
    for match in FROM_IMPORT.finditer(text):
        module, names = match.group(1), match.group(2)
        for name in (n.strip() for n in names.split(",")):
            if name and not _resolves(f"{module}.{name}"):
                missing.append(f"from {module} import {name}")
    assert missing == [], f"{_doc_id(doc)} names modules or objects that do not exist: {missing}"


def test_the_checks_above_catch_what_they_should() -> None:
    assert _resolves("worker.importer.enqueue") and _resolves("worker.providers.base.Accepted")
    assert not _resolves("worker.enqueue.InvalidRowsError") and not _resolves("worker.nothing")
    assert [m.group() for m in REPO_PATH.finditer("see `worker/x.py`, /etc/x, ~/.local/x")] == ["worker/x.py"]
    assert MODULE.findall("cola_worker.providers, cola-worker.timer and worker.lock") == ["worker.lock"]


# Built from pieces so that this file does not name them itself.
OUTSIDE = ("../" + "shared", "DESIGN" + ".md", "DESIGN" + " section")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True, check=True)
    files = []
    for name in out.stdout.split():
        path = PROJECT / name
        if path.suffix in {".py", ".md", ".toml", ".ini", ".cfg", ".txt", ".sql", ".yml", ".yaml", ""} and (
            path.is_file()
        ):
            files.append(path)
    return files


def test_nothing_points_outside_the_repository() -> None:
    offenders = []
    for path in _tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if any(needle in line for needle in OUTSIDE):
                offenders.append(f"{_doc_id(path)}:{number}: {line.strip()}")
    assert offenders == [], "point to docs/design.md instead:\n" + "\n".join(offenders)


def test_design_document_covers_the_contract() -> None:
    design = (PROJECT / "docs" / "design.md").read_text()
    for guarantee in ("G1", "G2", "G3", "G4", "G5", "G6", "G7"):
        assert f"**{guarantee}" in design, guarantee
    from worker.schema import STATES

    for state in STATES:
        assert f"`{state}`" in design, state
    for result in ("Accepted", "Throttled", "Retryable", "Permanent", "Ambiguous", "SenderBlocked"):
        assert f"`{result}`" in design, result
    for code in range(7):
        assert f"| {code} |" in design, f"exit code {code}"
