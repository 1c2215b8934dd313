"""The README is the user's manual: it names every setting and every command."""

from __future__ import annotations

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
