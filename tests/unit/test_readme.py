"""The README is the user's manual: it names every setting and every command."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from support import PROJECT

from worker.cli import build_parser
from worker.settings import OPTIONS

README = (PROJECT / "README.md").read_text()


def test_readme_documents_every_variable_with_its_default() -> None:
    for opt in OPTIONS:
        assert f"`{opt.env}`" in README, opt.env
        if opt.default is not None and opt.name != "lock_file":
            row = next(line for line in README.splitlines() if line.startswith(f"| `{opt.env}`"))
            assert f"`{opt.default}`" in row, (opt.env, row)


def test_readme_documents_every_command() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert f"`{name}" in README, name


def test_readme_gives_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README


def _guarantees_section() -> str:
    start = README.index("## Guarantees and how they are tested")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def _defined_tests(path: Path) -> set[str]:
    """``name`` and ``Class::name`` of every test function in a test file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            found.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name.startswith("test"):
                    found.add(f"{node.name}::{item.name}")
    return found


NODE_ID = re.compile(r"`(tests/[\w/]+\.py)::([\w:]+)(?:\[[^\]`]*\])?`")


def test_every_test_named_in_the_guarantees_table_exists() -> None:
    section = _guarantees_section()
    named = NODE_ID.findall(section)
    assert len(named) >= 30, "the table names too few tests: did the id format change?"
    missing = []
    for file, name in named:
        path = PROJECT / file
        if not path.is_file() or name not in _defined_tests(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"README names tests that do not exist: {missing}"


def test_every_guarantee_and_exit_code_has_a_row_with_a_test() -> None:
    rows = [line for line in _guarantees_section().splitlines() if line.startswith("| **")]
    keys = [line.split("**")[1] for line in rows]
    assert keys == [f"G{k}" for k in range(1, 8)] + [str(code) for code in range(7)]
    for line in rows:
        # A test id, or a placeholder the lead fills in when that test lands.
        assert NODE_ID.search(line) or "TODO(lead)" in line, line
    assert "make chaos" in _guarantees_section()


def test_the_table_checker_catches_a_stale_id() -> None:
    """The control: a renamed test is reported."""
    here = Path(__file__)
    assert "test_the_table_checker_catches_a_stale_id" in _defined_tests(here)
    assert "test_no_such_thing" not in _defined_tests(here)
