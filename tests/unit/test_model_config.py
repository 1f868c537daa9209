"""triton_vlm._protocol.model_config: the repository's config.pbtxt files and the request/response contract."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from triton_vlm._protocol.model_config import dump_model_config, force_instance_kind, load_model_config

from .helpers import REPOSITORY

CONFIGS = sorted(REPOSITORY.glob("*/config.pbtxt"))
#: Public models: one per family, served by the shared backend (and by the engine through a forwarder), plus
#: smolvlm, made by `triton-vlm add-model` for the auto family.
PUBLIC = ("kosmos2", "llava", "moondream2", "smolvlm")
FAMILY_OF = {"smolvlm": "auto"}
#: Companion models: decoupled engine models serving a public model's weights.
COMPANIONS = {"kosmos2_stream": "kosmos2", "llava_stream": "llava", "moondream2_stream": "moondream2"}
OPTIONAL = {"max_tokens": pb.TYPE_INT32, "temperature": pb.TYPE_FP32, "top_p": pb.TYPE_FP32, "seed": pb.TYPE_INT64,
            "ignore_eos": pb.TYPE_BOOL}
#: Inputs only some public models take.
EXTRA_OPTIONAL = {"moondream2": {"task": pb.TYPE_STRING}}
OUTPUTS = {"generated_text": pb.TYPE_STRING, "generated_tokens": pb.TYPE_INT32, "prompt_tokens": pb.TYPE_INT32,
           "finish_reason": pb.TYPE_STRING}
#: Outputs only some models have (the family's optional outputs; clients ask for them or not).
EXTRA_OUTPUTS = {"kosmos2": {"entities": pb.TYPE_STRING}, "kosmos2_stream": {"entities": pb.TYPE_STRING}}
ENGINE_PARAMETERS = ("max_model_len", "max_num_seqs", "kv_cache_memory_fraction", "cuda_graphs")


def load(model: str) -> pb.ModelConfig:
    return load_model_config(REPOSITORY / model / "config.pbtxt")


@pytest.fixture(params=CONFIGS, ids=lambda p: p.parent.name)
def config(request: pytest.FixtureRequest) -> pb.ModelConfig:
    return load_model_config(request.param)


@pytest.fixture(params=PUBLIC)
def public(request: pytest.FixtureRequest) -> pb.ModelConfig:
    return load(request.param)


def test_every_model_directory_has_a_parsing_config() -> None:
    assert {p.parent.name for p in CONFIGS} == {*PUBLIC, *COMPANIONS}
    for path in CONFIGS:
        assert load_model_config(path).name == path.parent.name
        assert (path.parent / "1" / "model.py").is_file()


def test_backend_is_python(config: pb.ModelConfig) -> None:
    assert config.backend == "python"


def assert_common_inputs(inputs: dict[str, pb.ModelInput]) -> None:
    image = inputs["image"]
    assert image.data_type == pb.TYPE_UINT8 and list(image.dims) == [-1] and image.allow_ragged_batch
    assert not image.optional
    prompt = inputs["prompt"]
    assert prompt.data_type == pb.TYPE_STRING and list(prompt.dims) == [1] and not prompt.optional
    for name, dtype in OPTIONAL.items():
        assert inputs[name].optional, name
        assert inputs[name].data_type == dtype and list(inputs[name].dims) == [1], name


def test_input_contract(public: pb.ModelConfig) -> None:
    inputs = {i.name: i for i in public.input}
    extra = EXTRA_OPTIONAL.get(public.name, {})
    assert set(inputs) == {"image", "prompt", *OPTIONAL, *extra}
    assert_common_inputs(inputs)
    for name, dtype in extra.items():
        assert inputs[name].optional and inputs[name].data_type == dtype and list(inputs[name].dims) == [1]


def test_ignore_eos_is_an_optional_bool_everywhere(config: pb.ModelConfig) -> None:
    ignore_eos = {i.name: i for i in config.input}["ignore_eos"]
    assert ignore_eos.optional and ignore_eos.data_type == pb.TYPE_BOOL and list(ignore_eos.dims) == [1]


def test_output_contract(config: pb.ModelConfig) -> None:
    outputs = {o.name: o for o in config.output}
    assert {name: o.data_type for name, o in outputs.items()} == {**OUTPUTS, **EXTRA_OUTPUTS.get(config.name, {})}
    assert [o.name for o in config.output][:4] == list(OUTPUTS)  # the common outputs first, in this order
    assert all(list(o.dims) == [1] for o in outputs.values())


def test_batching_contract(config: pb.ModelConfig) -> None:
    assert config.max_batch_size > 0
    assert config.HasField("dynamic_batching")


def test_public_models_are_not_decoupled(public: pb.ModelConfig) -> None:
    assert not public.model_transaction_policy.decoupled


def test_instances_are_gpu_by_default(config: pb.ModelConfig) -> None:
    assert len(config.instance_group) >= 1
    assert all(g.kind == pb.ModelInstanceGroup.KIND_GPU for g in config.instance_group)


def test_parameters_name_the_family(public: pb.ModelConfig) -> None:
    assert public.parameters["model_family"].string_value == FAMILY_OF.get(public.name, public.name)
    assert "base_model" not in public.parameters


# -- the engine companions (<model>_stream) ----------------------------------------------------------------------------
@pytest.mark.parametrize("companion, base", sorted(COMPANIONS.items()))
def test_companion_contract(companion: str, base: str) -> None:
    config, base_config = load(companion), load(base)
    assert config.model_transaction_policy.decoupled
    assert config.parameters["base_model"].string_value == base
    assert "model_family" not in config.parameters  # the family comes from the base model
    inputs = {i.name: i for i in config.input}
    base_inputs = {i.name: i for i in base_config.input}
    assert set(inputs) == {*base_inputs, "stream"}
    assert_common_inputs(inputs)
    for name, spec in base_inputs.items():
        assert inputs[name] == spec, name
    stream = inputs["stream"]
    assert stream.optional and stream.data_type == pb.TYPE_BOOL and list(stream.dims) == [1]
    assert list(config.output) == list(base_config.output)  # same outputs, same order
    for key in ENGINE_PARAMETERS:
        assert config.parameters[key].string_value, key
    assert config.max_batch_size >= base_config.max_batch_size


@pytest.mark.parametrize("companion, base", sorted(COMPANIONS.items()))
def test_companion_model_py_serves_the_base_family(companion: str, base: str) -> None:
    source = (REPOSITORY / companion / "1" / "model.py").read_text()
    assert "TritonVLMStreamModel" in source and f'family = "{base}"' in source


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
