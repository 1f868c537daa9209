"""triton_vlm.model_config: the repository's config.pbtxt files and the request/response contract."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from triton_vlm.model_config import dump_model_config, force_instance_kind, load_model_config

from .helpers import REPOSITORY

CONFIGS = sorted(REPOSITORY.glob("*/config.pbtxt"))
OPTIONAL = {"max_tokens": pb.TYPE_INT32, "temperature": pb.TYPE_FP32, "top_p": pb.TYPE_FP32, "seed": pb.TYPE_INT64}


@pytest.fixture(params=CONFIGS, ids=lambda p: p.parent.name)
def config(request: pytest.FixtureRequest) -> pb.ModelConfig:
    return load_model_config(request.param)


def test_every_model_directory_has_a_parsing_config() -> None:
    assert {p.parent.name for p in CONFIGS} == {"llava", "kosmos2", "moondream2"}
    for path in CONFIGS:
        assert load_model_config(path).name == path.parent.name
        assert (path.parent / "1" / "model.py").is_file()


def test_backend_is_python(config: pb.ModelConfig) -> None:
    assert config.backend == "python"


def test_input_contract(config: pb.ModelConfig) -> None:
    inputs = {i.name: i for i in config.input}
    assert set(inputs) == {"image", "prompt", *OPTIONAL}
    image = inputs["image"]
    assert image.data_type == pb.TYPE_UINT8 and list(image.dims) == [-1] and image.allow_ragged_batch
    assert not image.optional
    prompt = inputs["prompt"]
    assert prompt.data_type == pb.TYPE_STRING and list(prompt.dims) == [1] and not prompt.optional
    for name, dtype in OPTIONAL.items():
        assert inputs[name].optional, name
        assert inputs[name].data_type == dtype and list(inputs[name].dims) == [1], name


def test_output_contract(config: pb.ModelConfig) -> None:
    outputs = {o.name: o for o in config.output}
    assert outputs["generated_text"].data_type == pb.TYPE_STRING
    assert list(outputs["generated_text"].dims) == [1]
    assert outputs["generated_tokens"].data_type == pb.TYPE_INT32
    assert outputs["prompt_tokens"].data_type == pb.TYPE_INT32
    assert outputs["finish_reason"].data_type == pb.TYPE_STRING


def test_batching_contract(config: pb.ModelConfig) -> None:
    assert config.max_batch_size > 0
    assert config.HasField("dynamic_batching")


def test_instances_are_gpu_by_default(config: pb.ModelConfig) -> None:
    assert len(config.instance_group) >= 1
    assert all(g.kind == pb.ModelInstanceGroup.KIND_GPU for g in config.instance_group)


def test_parameters_name_the_family(config: pb.ModelConfig) -> None:
    assert config.parameters["model_family"].string_value == config.name


def test_force_instance_kind_cpu_clears_gpus() -> None:
    config = pb.ModelConfig()
    text_format.Parse('name: "m" instance_group [ { kind: KIND_GPU count: 2 gpus: [0, 1] },'
                      ' { kind: KIND_AUTO gpus: [3] } ]', config)
    force_instance_kind(config, "KIND_CPU")
    assert [g.kind for g in config.instance_group] == [pb.ModelInstanceGroup.KIND_CPU] * 2
    assert [list(g.gpus) for g in config.instance_group] == [[], []]
    assert config.instance_group[0].count == 2


def test_force_instance_kind_gpu_keeps_gpus() -> None:
    config = pb.ModelConfig()
    text_format.Parse('instance_group [ { kind: KIND_CPU gpus: [1] } ]', config)
    force_instance_kind(config, "KIND_GPU")
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert list(config.instance_group[0].gpus) == [1]


def test_force_instance_kind_rejects_unknown_kind(config: pb.ModelConfig) -> None:
    with pytest.raises(ValueError):
        force_instance_kind(config, "KIND_TPU")


def test_dump_round_trips(config: pb.ModelConfig, tmp_path: Path) -> None:
    force_instance_kind(config, "KIND_CPU")
    path = tmp_path / "config.pbtxt"
    path.write_text(dump_model_config(config))
    again = load_model_config(path)
    assert again == config
    assert again.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU


def test_typo_fails_with_position(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_text('name: "x"\nmax_batch_sise: 8\n')
    with pytest.raises(text_format.ParseError, match="2:1"):
        load_model_config(path)
