"""The docs stay true to the command line: every option of every command is
documented, every ``camx`` command in a code block parses, every link resolves,
and README stays a front page."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from cam_cli.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def text_of_docs() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in PAGES)


def commands() -> dict[str, click.Command]:
    ctx = click.Context(main)
    return {name: main.get_command(ctx, name) for name in main.list_commands(ctx)}  # type: ignore[misc]


def test_every_command_and_option_is_documented() -> None:
    docs = text_of_docs()
    for name, command in commands().items():
        assert f"camx {name}" in docs, f"the docs do not mention camx {name}"
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts:
                    assert re.search(rf"`{re.escape(opt)}[` =,\]]", docs) or f"`{opt}`" in docs or f"{opt} " in docs, (
                        f"camx {name} {opt} is not documented"
                    )


def code_lines() -> list[tuple[str, str]]:
    """(page, command line) of every ``camx ...`` line in a shell code block."""
    found = []
    for page in PAGES:
        inside = False
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                inside = line.strip() in ("```sh", "```bash", "```console", "```shell")
                continue
            stripped = line.strip().removeprefix("$ ")
            if inside and stripped.startswith("camx "):
                found.append((page.name, stripped))
    return found


def parse_error(line: str) -> str | None:
    """None when ``line`` parses as a camx command, else click's complaint."""
    command = re.split(r"\s(?:\||&&|;|>|#|\|\|)\s?|\s&$", line)[0]
    args = shlex.split(command)[1:]
    try:
        with main.make_context("camx", list(args), resilient_parsing=False) as ctx:
            name, sub, rest = main.resolve_command(ctx, ctx.protected_args + ctx.args)
            assert sub is not None
            sub.make_context(name or "", rest, parent=ctx)
    except click.BadParameter as exc:
        if "does not exist" in exc.format_message():
            return None  # a path of the example, not of this machine
        return exc.format_message()
    except click.exceptions.Exit:
        return None  # --help, --version
    except click.ClickException as exc:
        return exc.format_message()
    return None


def test_the_checker_sees_an_unknown_option() -> None:
    assert parse_error("camx explain x -o y --no-such-option") is not None
    assert parse_error("camx explain x -o y --method gradcam") is None


@pytest.mark.parametrize(("page", "line"), code_lines())
def test_every_command_in_the_docs_parses(page: str, line: str) -> None:
    assert parse_error(line) is None, f"{page}: {line}: {parse_error(line)}"


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", file.read_text(encoding="utf-8"), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_readme_is_a_front_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 260
    assert "make demo" in readme and "make test" in readme
