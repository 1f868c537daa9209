"""The docs against the code: every model name and every ``triton-vlm``/``triton_start.sh`` flag the README and
docs/*.md mention exists, and the lists of models they give are the ones the repository serves (issue 25: the docs
said the engine serves llava only, /v1/models listed three models, the README called a shipped model "made by
add-model")."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from triton_vlm.cli.main import _parser
from triton_vlm.launcher.repository import companions, list_models, servable_models

from .helpers import ROOT

REPOSITORY = ROOT / "triton_models"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: What the launcher serves: the repository's models and the engine models it derives beside them.
MODELS = {served for model in list_models(REPOSITORY) for served in (model, *companions(REPOSITORY, model))}
PUBLIC = set(servable_models(REPOSITORY))
ENGINES = {m for m in MODELS if m.endswith("_stream")}
#: Names the docs use for models a reader makes (add-model examples), not ones the repository ships.
EXAMPLE_MODELS = {"smolvlm-500m", "qwen2vl", "idefics3", "my_model", "mymodel"}


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


#: ``triton-vlm <command> ...`` or ``triton_start.sh ...`` up to the end of the command (a backtick, a pipe, a
#: comment, a line end, or another command).
_COMMAND = re.compile(r"(?:triton-vlm\s+(?P<sub>[a-z][a-z-]*)|triton_start\.sh)(?P<args>[^`|#;&\n]*)")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def mentioned_flags() -> list[tuple[str, str, str]]:
    """(doc, command, flag) for every flag written after a triton-vlm command or ./triton_start.sh."""
    found = []
    for path in DOCS:
        for match in _COMMAND.finditer(_text(path)):
            command = match.group("sub") or "start"  # triton_start.sh runs `triton-vlm start`
            for flag in _FLAG.findall(match.group("args")):
                found.append((path.name, command, flag))
    return found


def test_the_scan_finds_flags() -> None:
    flags = mentioned_flags()
    assert len(flags) > 30 and ("README.md", "start", "--tiny") in flags


@pytest.mark.parametrize("doc, command, flag", sorted(set(mentioned_flags())))
def test_every_flag_the_docs_mention_exists(doc: str, command: str, flag: str) -> None:
    commands = _subcommands()
    assert command in commands, f"{doc}: `triton-vlm {command}` is no command ({', '.join(commands)})"
    assert flag in _options(commands[command]) | {"--help"}, f"{doc}: `triton-vlm {command}` has no {flag}"


def test_every_stream_model_the_docs_name_exists() -> None:
    for path in DOCS:
        for name in set(re.findall(r"\b([a-z][a-z0-9]*_stream)\b", _text(path))) - {"generate_stream", "model_stream"}:
            assert name in MODELS, f"{path.name} names {name}, which the launcher does not serve"


def test_every_backticked_model_name_exists() -> None:
    """A backticked word that names a model (it is, or was, the name of a model directory: a family name such as
    `llava`, or `<family>_stream`) must be one the repository has."""
    families = {m.removesuffix("_stream") for m in MODELS}
    for path in DOCS:
        for name in set(re.findall(r"`([a-z][a-z0-9_-]*)`", _text(path))):
            base = name.removesuffix("_stream")
            if name.endswith("_stream") and base in families or name in families:
                assert name in MODELS or name in EXAMPLE_MODELS, f"{path.name}: `{name}` is not served"


def test_readme_models_table_is_the_served_models() -> None:
    readme = _text(ROOT / "README.md")
    section = readme[readme.index("## Models and weights"):]
    rows = re.findall(r"^\| `([a-z0-9_-]+)` \|(.*)$", section.split("\n\n", 2)[1], re.MULTILINE)
    assert {name for name, _ in rows} == PUBLIC
    for name, rest in rows:
        assert "made by `add-model`" not in rest, f"README: {name} ships in triton_models/, add-model does not make it"


def test_openai_docs_list_the_models_v1_models_returns() -> None:
    row = next(line for line in _text(ROOT / "docs" / "openai.md").splitlines() if line.startswith("| `GET /v1/models` |"))
    listed = set(re.findall(r"`([a-z0-9_]+)`", row.split("(", 1)[1].split(")", 1)[0]))
    assert listed == PUBLIC


def test_docs_name_every_engine_model_where_they_say_what_the_engine_serves() -> None:
    bases = {m.removesuffix("_stream") for m in ENGINES}
    for path in DOCS:
        for sentence in re.split(r"(?<=[.;])\s", _text(path).replace("\n", " ")):
            if re.search(r"engine serves|serves only|only llava", sentence):
                missing = [b for b in bases if b not in sentence]
                assert not missing, f"{path.name}: {sentence.strip()!r} leaves out {missing}"
