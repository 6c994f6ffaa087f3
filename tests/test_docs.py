"""The docs stay true to the command line: every option of every command is
documented in docs/, every ``camx`` command in a shell code block of README.md
or docs/*.md parses, every relative link resolves (anchors included), and
README stays a front page."""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from cam_cli.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
SHELL_FENCES = ("```sh", "```bash", "```console", "```shell")


def commands() -> dict[str, click.Command]:
    ctx = click.Context(main)
    found = {name: main.get_command(ctx, name) for name in main.list_commands(ctx)}
    return {name: command for name, command in found.items() if command is not None}


def option_names(command: click.Command) -> list[str]:
    """Every spelling of every option: ``--out`` and ``-o``, ``--help`` and ``-h``."""
    names = []
    for param in command.get_params(click.Context(command)):
        if isinstance(param, click.Option):
            names += [*param.opts, *param.secondary_opts]
    return names


# ------------------------------------------------------------------ reading pages


def blocks(text: str) -> Iterator[tuple[str | None, str]]:
    """(fence, line) for every line of a Markdown page: ``fence`` is the opening
    line of the fenced code block the line is in (``"```sh"``), None outside one."""
    fence = None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()
            continue
        yield fence, line


def code_of(text: str) -> str:
    """What a page shows as code: its inline code spans and its fenced blocks."""
    code = []
    for fence, line in blocks(text):
        if fence is not None:
            code.append(line)
        else:
            code += re.findall(r"`([^`]+)`", line)
    return "\n".join(code)


def mentions(code: str, option: str) -> bool:
    """``option`` appears in ``code`` as a word of its own (``--box`` is not ``--boxes``)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", code) is not None


def headings(text: str) -> list[str]:
    return [m.group(1).strip() for fence, line in blocks(text) if fence is None and (m := re.match(r"#+ (.*)", line))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, only letters, digits, spaces,
    hyphens and underscores kept, spaces turned into hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in headings(text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def sections(text: str) -> dict[str, str]:
    """The page's ``## `` sections, by heading."""
    found: dict[str, str] = {}
    current = None
    for fence, line in blocks(text):
        if fence is None and line.startswith("## "):
            current = line[3:].strip()
            found[current] = ""
        elif current is not None:
            found[current] += (f"{fence}\n{line}\n```" if fence else line) + "\n"
    return found


# ------------------------------------------------------------------ 1. every option documented


def test_every_command_and_option_is_documented() -> None:
    everything = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    docs_code = code_of("\n".join(page.read_text(encoding="utf-8") for page in DOCS))
    missing = []
    for name, command in commands().items():
        if f"camx {name}" not in everything:
            missing.append(f"camx {name} (the command)")
        missing += [f"camx {name} {opt}" for opt in option_names(command) if not mentions(docs_code, opt)]
    missing += [f"camx {opt}" for opt in option_names(main) if not mentions(docs_code, opt)]
    assert missing == [], f"not written as code anywhere in docs/*.md: {missing}"


def test_each_command_has_a_section_with_its_options() -> None:
    """docs/commands.md has a section per command that names every option of it."""
    page = sections((ROOT / "docs" / "commands.md").read_text(encoding="utf-8"))
    problems = []
    for name, command in commands().items():
        titled = [body for heading, body in page.items() if re.match(rf"`camx {name}(?![\w-])", heading)]
        if not titled:
            problems.append(f"no section titled `camx {name} ...`")
            continue
        code = code_of(titled[0])
        problems += [
            f"camx {name} {opt}"
            for opt in option_names(command)
            if opt not in ("-h", "--help") and not mentions(code, opt)
        ]
    assert problems == [], f"docs/commands.md: {problems}"


# ------------------------------------------------------------------ 2. every command in the docs parses


def shell_commands(line: str) -> list[str]:
    """The simple commands of one shell line: split at unquoted ``|``, ``&&``,
    ``||``, ``;`` and ``&``, without redirections (``> file``, ``2>&1``) and
    without a ``#`` comment. Enough shell for the examples in the docs."""
    found, current = [], ""
    quote = None
    i = 0
    while i < len(line):
        char = line[i]
        if quote:
            current += char
            if char == quote:
                quote = None
            elif char == "\\" and quote == '"' and i + 1 < len(line):
                current += line[i + 1]
                i += 1
        elif char in "'\"":
            quote = char
            current += char
        elif char == "\\" and i + 1 < len(line):
            current += line[i : i + 2]
            i += 1
        elif char == "#" and (not current or current[-1].isspace()):
            break
        elif char in "<>" or (char == "&" and line[i + 1 : i + 2] == ">"):
            current = re.sub(r"(^|\s)\d+$", r"\1", current)  # the file descriptor of 2>
            i += 1
            while i < len(line) and line[i] in "<>&":
                i += 1
            while i < len(line) and line[i].isspace():
                i += 1
            while i < len(line) and not line[i].isspace() and line[i] not in "|;&<>":
                i += 1  # the redirection's target
            continue
        elif char in "|&;":
            found.append(current)
            current = ""
            while i + 1 < len(line) and line[i + 1] in "|&;":
                i += 1
        else:
            current += char
        i += 1
    found.append(current)
    return [command.strip() for command in found if command.strip()]


def camx_args(command: str) -> list[str] | None:
    """The arguments ``camx`` gets from ``command`` (``camx ...``, ``python -m
    cam_cli ...``, ``torchrun ... -m cam_cli ...``, after any ``VAR=value``), or
    None for any other program."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        words = words[1:]
    if words[:1] == ["camx"]:
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "cam_cli":
            return words[i + 2 :]
    return None


def lenient(command: click.Command) -> click.Command:
    """``command`` with its paths' ``exists=True`` turned off: an example's paths
    are not this machine's, but every other check (options, arguments, choices,
    ranges, callbacks) still runs."""
    clone = copy.copy(command)
    clone.params = []
    for param in command.params:
        if isinstance(param.type, click.Path) and param.type.exists:
            param = copy.copy(param)
            param.type = copy.copy(param.type)
            param.type.exists = False  # type: ignore[attr-defined]
        clone.params.append(param)
    return clone


def parse_error(line: str) -> str | None:
    """None when every ``camx`` command in the shell line ``line`` parses, else
    click's complaint. Nothing is run: only the contexts are made."""
    for command in shell_commands(line):
        args = camx_args(command)
        if args is None:
            continue
        try:
            with main.make_context("camx", list(args)) as ctx:
                name = next((arg for arg in args if not arg.startswith("-")), None)
                sub = main.get_command(ctx, name) if name else None
                if name is None or sub is None:
                    return f"no such command: {name!r}"
                rest = args[args.index(name) + 1 :]
                with lenient(sub).make_context(name, rest, parent=ctx):
                    pass
        except click.exceptions.Exit:
            continue  # --help, --version
        except click.BadParameter as exc:
            if "does not exist" in exc.format_message():
                continue  # a path of the example, not of this machine
            return f"{command}: {exc.format_message()}"
        except click.ClickException as exc:
            return f"{command}: {exc.format_message()}"
    return None


def code_lines() -> list[tuple[str, str]]:
    """(page, line) of every line of a shell code block that runs camx."""
    found = []
    for page in PAGES:
        pending = ""
        for fence, line in blocks(page.read_text(encoding="utf-8")):
            if fence not in SHELL_FENCES:
                continue
            line = pending + line.strip().removeprefix("$ ")
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if any(camx_args(command) is not None for command in shell_commands(line)):
                found.append((page.relative_to(ROOT).as_posix(), line))
    return found


def test_the_checker_knows_good_from_bad() -> None:
    bad = [
        "camx explain x -o y --no-such-option",
        "camx explain x",  # -o is required
        "camx methods extra",
        "camx evaluate out --baseline nope",
        "camx evaluate",
        "camx explain x -o y --shard 5/4",
        "camx nosuchcommand",
        "find . | camx explain --files-from - -o out --bogus",
        "torchrun --nproc-per-node 2 -m cam_cli explain x --no-such-option",
    ]
    good = [
        "camx explain x -o y --method gradcam",
        "$ camx explain x -o y --json -q > run.json 2>&1 || echo failed  # a comment",
        "camx merge ./not-here",  # OUT_DIR must exist: not checked here
        "camx evaluate out --boxes-from not-here.csv --labels not-here.txt",
        "camx models --source timm 'convnext_*' | grep atto",
        "camx --version",
        "camx explain --help",
    ]
    assert [line for line in bad if parse_error(line.removeprefix("$ ")) is None] == []
    assert {line: parse_error(line.removeprefix("$ ")) for line in good} == dict.fromkeys(good)


def test_the_docs_have_commands_to_check() -> None:
    pages = {page for page, _ in code_lines()}
    assert {"README.md", "docs/commands.md", "docs/evaluate.md", "docs/scale.md"} <= pages


@pytest.mark.parametrize(("page", "line"), code_lines())
def test_every_command_in_the_docs_parses(page: str, line: str) -> None:
    error = parse_error(line)
    assert error is None, f"{page}: {line}: {error}"


# ------------------------------------------------------------------ 3. links and the front page


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        prose = "\n".join(line for fence, line in blocks(text) if fence is None)
        prose = re.sub(r"`[^`]*`", "", prose)
        for target in re.findall(r"\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)", prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT).as_posix()}: {target}"
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{where} (no such heading)")
    assert broken == []


def test_slugs_are_githubs() -> None:
    assert slug("Offline use and weights") == "offline-use-and-weights"
    assert (
        slug("Score-CAM and Ablation-CAM (perturbation methods)") == "score-cam-and-ablation-cam-perturbation-methods"
    )
    assert slug("`camx evaluate OUT [options]`") == "camx-evaluate-out-options"
    assert slug("Shards: `--shard K/N`") == "shards---shard-kn"
    assert slug("Where a run's time goes") == "where-a-runs-time-goes"


def test_readme_is_a_front_page() -> None:
    readme = README.read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 260
    assert "make demo" in readme and "make test" in readme
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", readme))
    assert {f"docs/{page.name}" for page in DOCS} <= linked, "README links to every page of docs/"


def test_every_docs_page_has_a_title_and_an_intro() -> None:
    for page in DOCS:
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# "), f"{page.name}: no title"
        assert lines[1] == "" and lines[2] and not lines[2].startswith(("#", "|", "```", "-")), f"{page.name}: no intro"
