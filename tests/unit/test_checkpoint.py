"""``triton-vlm serve MODEL_ID_OR_DIR`` and ``--model-id``: the family picked from config.json's architectures, the
config read from a directory or the Hugging Face cache, the served name, and the repository entry it becomes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from triton_vlm.cli.main import _parser, _server_options
from triton_vlm.config import read_config_file, read_settings
from triton_vlm.errors import TritonVLMError, UnknownModelError
from triton_vlm.launcher import LauncherError, ServerOptions
from triton_vlm.launcher.checkpoint import (
    CheckpointRequest,
    ServedCheckpoint,
    read_checkpoint_config,
    resolve_checkpoint,
    served_name,
    write_entry,
)
from triton_vlm.launcher.compose import compose_environment
from triton_vlm.launcher.repository import companions, model_settings, render_repository
from triton_vlm.models import available_families, get_family, registry
from triton_vlm.models.llava import LlavaFamily
from triton_vlm.models.registry import architecture_families, family_for_architectures
from triton_vlm.tiny import ensure_tiny_checkpoint

from .helpers import ROOT

#: The architecture each shipped engine family declares: the class name transformers writes into config.json
#: (moondream2: what vikhyatk/moondream2's own config.json names).
DECLARED = {"LlavaForConditionalGeneration": "llava", "Kosmos2ForConditionalGeneration": "kosmos2",
            "HfMoondream": "moondream2"}


def _checkpoint(directory: Path, *architectures: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"architectures": list(architectures)}))
    return directory


# -- the family, from config.json's architectures -----------------------------------------------------------------
@pytest.mark.parametrize("architecture, family", sorted(DECLARED.items()))
def test_each_family_is_picked_by_its_architecture(tmp_path: Path, architecture: str, family: str) -> None:
    assert architecture_families()[architecture] == family
    source = _checkpoint(tmp_path / "ckpt", architecture)
    assert resolve_checkpoint(CheckpointRequest(str(source))).family == family
    # A later entry is looked at too: the first one a family serves wins.
    assert family_for_architectures(["SomethingElse", architecture]) == family


@pytest.mark.parametrize("family", [f for f in available_families() if get_family(f).architectures])
def test_a_familys_tiny_checkpoint_names_an_architecture_it_declares(family: str) -> None:
    """The tiny checkpoints are built by the real classes (transformers' save_pretrained writes their names), so a
    misspelt or made-up name in ``architectures`` fails here; new families are picked up by themselves."""
    config = read_checkpoint_config(str(ensure_tiny_checkpoint(family)))
    assert set(config["architectures"]) & set(get_family(family).architectures)
    assert family_for_architectures(config["architectures"]) == family


def test_every_declared_architecture_belongs_to_one_family() -> None:
    table = architecture_families()
    assert DECLARED.items() <= table.items()
    assert "auto" not in table.values()  # auto serves by name only: --family auto


def test_two_families_claiming_one_architecture_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._FAMILIES, "zz_clone", (__name__, "LlavaClone"))
    with pytest.raises(ValueError, match="'LlavaForConditionalGeneration' is claimed by two families, 'llava' and "
                                         "'zz_clone'"):
        architecture_families()


def test_an_unknown_architecture_lists_the_supported_ones_and_auto(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "paligemma", "PaliGemmaForConditionalGeneration")
    with pytest.raises(LauncherError) as error:
        resolve_checkpoint(CheckpointRequest(str(source)))
    message = str(error.value)
    assert "PaliGemmaForConditionalGeneration, which no family here serves" in message
    for architecture, family in DECLARED.items():
        assert f"{architecture} ({family})" in message
    assert "--family auto" in message and "AutoModelForImageTextToText" in message
    # --family forces one; auto claims no architecture, so it is the way to serve any other.
    forced = resolve_checkpoint(CheckpointRequest(str(source), family="auto"))
    assert (forced.family, forced.architectures) == ("auto", ("PaliGemmaForConditionalGeneration",))
    with pytest.raises(UnknownModelError, match="known families: auto"):
        resolve_checkpoint(CheckpointRequest(str(source), family="blip2"))


def test_a_config_without_architectures_says_so(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(LauncherError, match="names no architectures, which no family"):
        resolve_checkpoint(CheckpointRequest(str(tmp_path)))


# -- reading config.json ------------------------------------------------------------------------------------------
def test_sources_that_are_neither_a_directory_nor_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(LauncherError, match="not a checkpoint directory \\(no config.json\\)"):
        read_checkpoint_config(str(tmp_path))
    for bad in (str(tmp_path / "missing"), "./missing", "a/b/c", "has space/x"):
        with pytest.raises(LauncherError, match="neither a checkpoint directory nor a Hugging Face id"):
            read_checkpoint_config(bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LauncherError, match="neither"):
        read_checkpoint_config(str(tmp_path / "file"))
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(LauncherError, match="not a JSON object"):
        read_checkpoint_config(str(tmp_path))


def _fake_hub_cache(cache: Path, model_id: str, revisions: dict[str, str]) -> None:
    """huggingface_hub's cache layout: ``models--owner--name/refs/<revision>`` holds a commit, whose snapshot
    holds the files."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    for number, (revision, architecture) in enumerate(revisions.items()):
        commit = f"{number:040d}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        _checkpoint(repo / "snapshots" / commit, architecture)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def test_a_hub_id_is_read_from_the_cache_offline_at_its_revision(tmp_path: Path, offline: None) -> None:
    _fake_hub_cache(tmp_path, "llava-hf/llava-1.5-7b-hf", {"main": "LlavaForConditionalGeneration",
                                                           "v2": "Kosmos2ForConditionalGeneration"})
    main = read_checkpoint_config("llava-hf/llava-1.5-7b-hf", cache_dir=tmp_path)
    assert main["architectures"] == ["LlavaForConditionalGeneration"]
    assert read_checkpoint_config("llava-hf/llava-1.5-7b-hf", "v2", cache_dir=tmp_path)["architectures"] == [
        "Kosmos2ForConditionalGeneration"]


def test_a_hub_id_offline_and_not_cached_says_how_to_get_it(tmp_path: Path, offline: None) -> None:
    with pytest.raises(LauncherError) as error:
        read_checkpoint_config("llava-hf/llava-1.5-7b-hf", "v2", cache_dir=tmp_path)
    message = str(error.value)
    assert "config.json of llava-hf/llava-1.5-7b-hf (revision v2)" in message
    assert "offline mode (HF_HUB_OFFLINE=1) found no cached copy" in message
    assert "`hf download llava-hf/llava-1.5-7b-hf --revision v2`" in message and "serve its directory" in message


def test_the_cli_says_it_too_reading_hf_hub_cache(tmp_path: Path) -> None:
    """As a user meets it: a fresh process whose huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE itself."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "TRITON_VLM_MODE": "embedded",
           "HOME": str(tmp_path)}
    args = ["start", "--model-id", "llava-hf/llava-1.5-7b-hf", "--dry-run", "--http-port", "1", "--grpc-port", "2",
            "--metrics-port", "3"]
    command = [sys.executable, "-m", "triton_vlm.cli.main", *args]
    missing = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1 and "error: cannot read the config.json of llava-hf/llava-1.5-7b-hf: offline" \
                                      in missing.stderr, missing.stderr
    _fake_hub_cache(tmp_path, "llava-hf/llava-1.5-7b-hf", {"main": "LlavaForConditionalGeneration"})
    found = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert found.returncode == 0, found.stderr
    assert ("would serve llava-1.5-7b-hf and llava-1.5-7b-hf_stream from llava-hf/llava-1.5-7b-hf (family llava; "
            "architecture LlavaForConditionalGeneration)") in found.stdout


# -- names ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source, name", [
    ("llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf"), ("Qwen/Qwen2-VL-2B-Instruct", "Qwen2-VL-2B-Instruct"),
    ("gpt2", "gpt2"), ("/models/my llava+v2/", "my-llava-v2"), ("/x/.hidden_", "hidden"), ("/x/a_stream", "a-stream"),
    ("/x/" + "m" * 80, "m" * 64), ("/", "model"),
])
def test_the_served_name_comes_from_the_id_or_directory(source: str, name: str) -> None:
    assert served_name(source) == name


def test_name_overrides_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "ckpt", "LlavaForConditionalGeneration")
    assert resolve_checkpoint(CheckpointRequest(str(source), name="mine")).name == "mine"
    bad = resolve_checkpoint(CheckpointRequest(str(source), name="x/y"))
    with pytest.raises(TritonVLMError, match="model name 'x/y'"):
        write_entry(tmp_path / "repo", bad)
    with pytest.raises(LauncherError, match="--revision applies to Hugging Face ids"):
        resolve_checkpoint(CheckpointRequest(str(source), revision="v2"))


# -- the repository entry ------------------------------------------------------------------------------------------
def test_a_directory_becomes_a_public_model_and_its_stream_with_local_path(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "ckpt", "LlavaForConditionalGeneration")
    checkpoint = resolve_checkpoint(CheckpointRequest(str(source), name="tiny-llava"))
    assert checkpoint == ServedCheckpoint("tiny-llava", "llava", "", str(source.resolve()), "main",
                                          ("LlavaForConditionalGeneration",))
    assert checkpoint.served_models() == ["tiny-llava", "tiny-llava_stream"]
    repository = tmp_path / "repo"
    write_entry(repository, checkpoint)
    name, parameters = read_config_file(repository / "tiny-llava" / "config.pbtxt")
    assert parameters == {"model_family": "llava", "local_path": str(source.resolve())}  # no hf_model_id: unused
    assert companions(repository, "tiny-llava") == ["tiny-llava_stream"]
    served = render_repository(repository, tmp_path / "served", ["tiny-llava", "tiny-llava_stream"], "KIND_CPU")
    assert sorted(p.name for p in served.iterdir()) == ["tiny-llava", "tiny-llava_stream"]
    for model in ("tiny-llava", "tiny-llava_stream"):
        settings = model_settings(repository, model, env={})
        assert (settings.family, settings.weights.local_path, settings.weights.hf_model_id) == (
            "llava", str(source.resolve()), "")
    assert 'family = "llava"' in (served / "tiny-llava_stream" / "1" / "model.py").read_text()
    assert 'family = "llava"' in (served / "tiny-llava" / "1" / "model.py").read_text()


def test_a_hub_id_under_auto_is_a_public_model_alone_with_its_id_and_revision(tmp_path: Path,
                                                                                offline: None) -> None:
    _fake_hub_cache(tmp_path / "cache", "Qwen/Qwen2-VL-2B-Instruct", {"v1": "Qwen2VLForConditionalGeneration"})
    checkpoint = resolve_checkpoint(CheckpointRequest("Qwen/Qwen2-VL-2B-Instruct", family="auto", revision="v1"),
                                    cache_dir=tmp_path / "cache")
    assert checkpoint.served_models() == ["Qwen2-VL-2B-Instruct"]  # no engine: no _stream
    write_entry(tmp_path / "repo", checkpoint)
    _, parameters = read_config_file(tmp_path / "repo" / "Qwen2-VL-2B-Instruct" / "config.pbtxt")
    assert parameters == {"model_family": "auto", "hf_model_id": "Qwen/Qwen2-VL-2B-Instruct", "revision": "v1"}
    assert companions(tmp_path / "repo", "Qwen2-VL-2B-Instruct") == []
    settings = read_settings("Qwen2-VL-2B-Instruct", parameters, env={})
    assert (settings.weights.hf_model_id, settings.weights.revision, settings.weights.local_path) == (
        "Qwen/Qwen2-VL-2B-Instruct", "v1", "")


# -- the command line and the launcher options ---------------------------------------------------------------------
def _options(*argv: str) -> ServerOptions:
    return _server_options(_parser().parse_args(list(argv)))


def test_serve_and_start_name_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("TRITON_VLM_MODEL_ID", "TRITON_VLM_MODEL_NAME", "TRITON_VLM_MODEL_FAMILY", "TRITON_VLM_MODELS"):
        monkeypatch.delenv(variable, raising=False)
    source = str(_checkpoint(tmp_path / "ckpt", "LlavaForConditionalGeneration"))
    expected = CheckpointRequest(source, name="n", family="auto", revision="main")
    assert _options("serve", source, "--name", "n", "--family", "auto").checkpoint == expected
    assert _options("serve", "--model-id", source, "--name", "n", "--family", "auto").checkpoint == expected
    assert _options("start", "--model-id", source, "--name", "n", "--family", "auto").checkpoint == expected
    hub = _options("serve", "org/model", "--revision", "v2")
    assert (hub.checkpoint, hub.models) == (CheckpointRequest("org/model", revision="v2"), ())
    # A model of the project's repository is served as --models names it.
    assert (_options("serve", "llava").models, _options("serve", "llava").checkpoint) == (("llava",), None)
    assert _options("serve", "--models", "llava,kosmos2").checkpoint is None


def test_serve_refuses_mixed_selections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_VLM_MODEL_ID", raising=False)
    with pytest.raises(LauncherError, match="serve either the checkpoint org/model or models of a repository"):
        _options("serve", "org/model", "--models", "llava")
    with pytest.raises(LauncherError, match="two checkpoints"):
        _options("serve", "org/a", "--model-id", "org/b")
    with pytest.raises(LauncherError, match="--name, --family apply to a checkpoint"):
        _options("serve", "--models", "llava", "--name", "x", "--family", "auto")
    with pytest.raises(TritonVLMError, match="llava is a model of the repository"):
        _options("serve", "llava", "--name", "x")


def test_the_container_gets_the_checkpoint_through_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    options = ServerOptions(checkpoint=CheckpointRequest("org/model", name="m", family="auto", revision="v2"))
    env = compose_environment(options, base={})
    assert {k: env[k] for k in env if k.startswith("TRITON_VLM_MODEL_")} == {
        "TRITON_VLM_MODEL_ID": "org/model", "TRITON_VLM_MODEL_NAME": "m", "TRITON_VLM_MODEL_FAMILY": "auto",
        "TRITON_VLM_MODEL_REVISION": "v2"}
    # ... where `triton-vlm serve` reads them as its flags' defaults (when the parser is built).
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _options("serve").checkpoint == options.checkpoint
    for text in ((ROOT / "docker-compose.yml").read_text(), (ROOT / "docker-compose-cpu.yml").read_text()):
        assert "TRITON_VLM_MODEL_ID: ${TRITON_VLM_MODEL_ID:-}" in text


def test_lookup_imports_no_transformers_and_no_engine() -> None:
    """The architecture table imports each family's small family module, never transformers' model code, the
    engine or a family's engine adapter (those stay lazy, for the stubs that build an engine)."""
    code = ("import sys; from triton_vlm.models.registry import architecture_families as a; a(); "
            "print([m for m in sys.modules if m.split('.')[0] == 'transformers' or m.startswith('triton_vlm.engine')"
            " or m.endswith(('engine_adapter', 'engine_decoder'))])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


class LlavaClone(LlavaFamily):
    """A second family claiming llava's architecture (test_two_families_claiming_one_architecture_is_refused)."""

    name = "zz_clone"
