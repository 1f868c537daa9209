"""triton_vlm._protocol.model_config: the repository's config.pbtxt files and the request/response contract, with the
``<model>_stream`` engine models the launcher derives from them (triton_vlm.config.contract, launcher/repository.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from triton_vlm._protocol.model_config import dump_model_config, force_instance_kind, load_model_config
from triton_vlm.config import read_settings, string_parameters
from triton_vlm.config.contract import complete_config, template
from triton_vlm.launcher.repository import public_config, stream_config
from triton_vlm.models import get_family

from .helpers import REPOSITORY, ROOT

CONFIGS = sorted(REPOSITORY.glob("*/config.pbtxt"))
LEGACY = ROOT / "tests" / "data" / "legacy_stream_configs"
#: Public models: one per family, served by the shared backend (and by the engine through a forwarder), plus
PUBLIC = ("kosmos2", "llava", "llava_next", "llava_onevision", "moondream2", "qwen2_vl", "smolvlm")
#: Public models whose family is not their name (made by `triton-vlm add-model`); none ship today.
FAMILY_OF: dict[str, str] = {}
#: Engine models: decoupled, serving a public model's weights; derived from its config at launch.
COMPANIONS = {"kosmos2_stream": "kosmos2", "llava_stream": "llava", "moondream2_stream": "moondream2",
              "qwen2_vl_stream": "qwen2_vl", "smolvlm_stream": "smolvlm", "llava_next_stream": "llava_next",
              "llava_onevision_stream": "llava_onevision"}
OPTIONAL = {"max_tokens": pb.TYPE_INT32, "temperature": pb.TYPE_FP32, "top_p": pb.TYPE_FP32, "seed": pb.TYPE_INT64,
            "ignore_eos": pb.TYPE_BOOL, "response_format": pb.TYPE_STRING, "n": pb.TYPE_INT32, "logprobs": pb.TYPE_BOOL,
            "top_logprobs": pb.TYPE_INT32, "presence_penalty": pb.TYPE_FP32, "frequency_penalty": pb.TYPE_FP32,
            "repetition_penalty": pb.TYPE_FP32}
#: Inputs only some public models take.
EXTRA_OPTIONAL = {"moondream2": {"task": pb.TYPE_STRING}}
OUTPUTS = {"generated_text": pb.TYPE_STRING, "generated_tokens": pb.TYPE_INT32, "prompt_tokens": pb.TYPE_INT32,
           "finish_reason": pb.TYPE_STRING, "token_logprobs": pb.TYPE_STRING, "choices": pb.TYPE_STRING,
           "index": pb.TYPE_INT32, "cached_tokens": pb.TYPE_INT32}
#: Outputs only some models have (the family's optional outputs; clients ask for them or not).
EXTRA_OUTPUTS = {"kosmos2": {"entities": pb.TYPE_STRING}, "kosmos2_stream": {"entities": pb.TYPE_STRING}}


def load(model: str) -> pb.ModelConfig:
    """A public model's config.pbtxt, or the config the launcher derives for an engine model."""
    if model in COMPANIONS:
        base = COMPANIONS[model]
        return stream_config(public_config(REPOSITORY, base), FAMILY_OF.get(base, base))
    return load_model_config(REPOSITORY / model / "config.pbtxt")


@pytest.fixture(params=[*PUBLIC, *COMPANIONS])
def config(request: pytest.FixtureRequest) -> pb.ModelConfig:
    return load(request.param)


@pytest.fixture(params=PUBLIC)
def public(request: pytest.FixtureRequest) -> pb.ModelConfig:
    return load(request.param)


def test_every_model_directory_has_a_parsing_config() -> None:
    assert {p.parent.name for p in CONFIGS} == set(PUBLIC)  # the engine models have no directory
    for path in CONFIGS:
        assert load_model_config(path).name == path.parent.name
        assert (path.parent / "1" / "model.py").is_file()


def test_backend_is_python(config: pb.ModelConfig) -> None:
    assert config.backend == "python"


def assert_common_inputs(inputs: dict[str, pb.ModelInput]) -> None:
    # The seed's image + prompt, unchanged but for being optional: a chat sends messages + images instead.
    image = inputs["image"]
    assert image.data_type == pb.TYPE_UINT8 and list(image.dims) == [-1] and image.allow_ragged_batch
    assert image.optional
    prompt = inputs["prompt"]
    assert prompt.data_type == pb.TYPE_STRING and list(prompt.dims) == [1] and prompt.optional
    messages = inputs["messages"]
    assert messages.data_type == pb.TYPE_STRING and list(messages.dims) == [1] and messages.optional
    images = inputs["images"]  # BYTES, one element per image, sizes differ: ragged
    assert images.data_type == pb.TYPE_STRING and list(images.dims) == [-1] and images.optional
    assert images.allow_ragged_batch
    stop = inputs["stop"]  # up to 4 strings, one per element
    assert stop.data_type == pb.TYPE_STRING and list(stop.dims) == [-1] and stop.optional and stop.allow_ragged_batch
    for name, dtype in OPTIONAL.items():
        assert inputs[name].optional, name
        assert inputs[name].data_type == dtype and list(inputs[name].dims) == [1], name


def test_input_contract(public: pb.ModelConfig) -> None:
    inputs = {i.name: i for i in public.input}
    extra = EXTRA_OPTIONAL.get(public.name, {})
    assert set(inputs) == {"image", "prompt", "messages", "images", "stop", *OPTIONAL, *extra}
    assert_common_inputs(inputs)
    for name, dtype in extra.items():
        assert inputs[name].optional and inputs[name].data_type == dtype and list(inputs[name].dims) == [1]


def test_ignore_eos_is_an_optional_bool_everywhere(config: pb.ModelConfig) -> None:
    ignore_eos = {i.name: i for i in config.input}["ignore_eos"]
    assert ignore_eos.optional and ignore_eos.data_type == pb.TYPE_BOOL and list(ignore_eos.dims) == [1]


def test_output_contract(config: pb.ModelConfig) -> None:
    outputs = {o.name: o for o in config.output}
    assert {name: o.data_type for name, o in outputs.items()} == {**OUTPUTS, **EXTRA_OUTPUTS.get(config.name, {})}
    assert [o.name for o in config.output][:len(OUTPUTS)] == list(OUTPUTS)  # the common outputs first, in this order
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


# -- the engine models (<model>_stream), derived at launch -------------------------------------------------------------
@pytest.mark.parametrize("companion, base", sorted(COMPANIONS.items()))
def test_companion_contract(companion: str, base: str) -> None:
    config, base_config = load(companion), load(base)
    assert config.model_transaction_policy.decoupled
    assert config.parameters["base_model"].string_value == base
    # The base model's parameters, so the engine model's stub needs no other file.
    assert {k: v for k, v in config.parameters.items() if k != "base_model"} == dict(base_config.parameters)
    inputs = {i.name: i for i in config.input}
    base_inputs = {i.name: i for i in base_config.input}
    assert set(inputs) == {*base_inputs, "stream"}
    assert_common_inputs(inputs)
    for name, spec in base_inputs.items():
        assert inputs[name] == spec, name
    stream = inputs["stream"]
    assert stream.optional and stream.data_type == pb.TYPE_BOOL and list(stream.dims) == [1]
    assert list(config.output) == list(base_config.output)  # same outputs, same order
    assert config.max_batch_size == read_settings(companion, string_parameters(config.parameters),
                                                  env={}).engine.max_num_seqs  # execute() only enqueues
    assert config.max_batch_size >= base_config.max_batch_size
    assert not config.dynamic_batching.HasField("default_queue_policy")  # the engine bounds its own queue


def test_engine_sizing_set_in_the_public_config_sizes_the_derived_one() -> None:
    public = load("llava")
    public.parameters["max_num_seqs"].string_value = "128"
    public.instance_group[0].count = 2
    derived = stream_config(public, "llava")
    assert derived.max_batch_size == 128
    assert [g.count for g in derived.instance_group] == [1]  # one engine owns the GPU


#: The engine models that had a stream file of their own before the launcher derived them (later ones never did).
LEGACY_COMPANIONS = ("kosmos2_stream", "llava_stream", "moondream2_stream")


@pytest.mark.parametrize("companion, base", [(c, COMPANIONS[c]) for c in LEGACY_COMPANIONS])
def test_derived_engine_configs_say_what_the_old_stream_files_said(companion: str, base: str) -> None:
    """Before, triton_models/<m>_stream/config.pbtxt was a near-copy of <m>'s (tests/data/legacy_stream_configs/;
    smolvlm_stream came later, derived from the start);
    the launcher's derivation gives the same Triton config, and the same settings once the launcher added the base
    model's parameters (as it did then)."""
    derived = load(companion)
    legacy = load_model_config(LEGACY / f"{companion}.pbtxt")
    legacy_parameters = {**json.loads((LEGACY / "public_parameters.json").read_text())[base],
                         **string_parameters(legacy.parameters)}
    env = {"TRITON_VLM_LLAVA_STREAM_QUANTIZATION": "fp8", "TRITON_VLM_KOSMOS2_MAX_NUM_SEQS": "4"}
    assert read_settings(companion, string_parameters(derived.parameters), env=env) == read_settings(
        companion, legacy_parameters, env=env)
    assert derived.parameters["base_model"].string_value == base
    derived.ClearField("parameters")
    legacy.ClearField("parameters")
    legacy_inputs = {spec.name for spec in legacy.input}
    # Since then the contract grew the chat inputs and response_format (issue 24) and image + prompt became
    # optional; the rest stands.
    chat = [spec for spec in derived.input if spec.name in ("messages", "images", "response_format")]
    assert [spec.name for spec in chat] == ["messages", "images", "response_format"]
    for spec in chat:
        derived.input.remove(spec)
    # ... and the sampling and output options (issue 24, second part).
    sampling = [spec for spec in derived.input if spec.name in ("stop", *OPTIONAL) and spec.name not in legacy_inputs]
    assert [spec.name for spec in sampling] == ["stop", "n", "logprobs", "top_logprobs", "presence_penalty",
                                                "frequency_penalty", "repetition_penalty"]
    for spec in sampling:
        derived.input.remove(spec)
    for spec in [o for o in derived.output if o.name in ("token_logprobs", "choices", "index", "cached_tokens")]:
        derived.output.remove(spec)
    for spec in derived.input:
        if spec.name in ("image", "prompt"):
            spec.optional = False
    assert derived == legacy


def test_the_template_is_the_contract_every_public_model_spells_out(public: pb.ModelConfig) -> None:
    """A config with only its name, backend and parameters (what add-model writes) is completed to exactly the
    shipped one: the shared contract plus the family's task input and optional outputs."""
    family = get_family(FAMILY_OF.get(public.name, public.name))
    short = pb.ModelConfig(name=public.name, backend=public.backend)
    for key, value in public.parameters.items():
        short.parameters[key].CopyFrom(value)
    assert complete_config(short, family.tasks, family.extra_outputs)
    assert short == public
    assert not complete_config(short)  # a complete config is left as it is


def test_complete_config_keeps_what_a_short_config_sets() -> None:
    config = pb.ModelConfig(name="m", max_batch_size=2)
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=3)
    assert complete_config(config, ("query",), ("entities",))
    assert (config.max_batch_size, config.backend, [g.count for g in config.instance_group]) == (2, "python", [3])
    assert [i.name for i in config.input][-1] == "task" and [o.name for o in config.output][-1] == "entities"
    assert [i.name for i in config.input][:-1] == [i.name for i in template().input]


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
