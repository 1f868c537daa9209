"""Through the real tritonserver: kosmos2's optional ``entities`` output, ``--draw``, and smolvlm (Idefics3 with
image splitting) served by its own family and on the engine in --tiny mode. The ``auto`` family is served by no
model of this session: tests/unit/test_auto.py runs an add-model SmolVLM of it through the runtime the backend uses."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.conftest import ROOT, SAMPLE_IMAGE
from tests.integration.conftest import RunningServer

from triton_client import TritonVLMClient
from triton_vlm.cli.main import main
from triton_vlm.client.entities import parse_entities
from triton_vlm.direct import direct_runtime
from triton_vlm.runtime import VLMRuntime

pytestmark = pytest.mark.integration

GROUNDING = "<grounding> An image of"


@pytest.fixture(scope="module")
def kosmos2() -> VLMRuntime:
    return direct_runtime("kosmos2", tiny=True, device="cpu")


def _direct(runtime: VLMRuntime, image: bytes, prompt: str, **sampling: object):  # type: ignore[no-untyped-def]
    (out,) = runtime.generate([runtime.make_request(image, prompt, **sampling)])  # type: ignore[arg-type]
    assert not isinstance(out, Exception), out
    return out


@pytest.mark.parametrize("protocol, prompt", [("http", GROUNDING), ("grpc", GROUNDING), ("http", "What is this?")])
def test_kosmos2_entities_served_equal_direct(triton: RunningServer, kosmos2: VLMRuntime, protocol: str,
                                              prompt: str, sample_image_bytes: bytes) -> None:
    # The tiny weights are random: they tag nothing. Exact entities from a crafted answer: tests/unit/test_grounding.py.
    url = triton.http_url if protocol == "http" else triton.grpc_url
    with TritonVLMClient(url, protocol=protocol) as client:  # type: ignore[arg-type]
        result = client.infer_result("kosmos2", sample_image_bytes, prompt, max_tokens=12)
    expected = _direct(kosmos2, sample_image_bytes, prompt, max_tokens=12)
    assert result.text == expected.text
    assert isinstance(json.loads(expected.extras["entities"]), list)
    assert result.entities == parse_entities(expected.extras["entities"])


def test_entities_output_is_a_json_list_and_optional(triton: RunningServer, kosmos2: VLMRuntime,
                                                     sample_image_bytes: bytes) -> None:
    import tritonclient.http as http

    data = np.frombuffer(sample_image_bytes, dtype=np.uint8)[None, :]
    inputs = [http.InferInput("image", list(data.shape), "UINT8"), http.InferInput("prompt", [1, 1], "BYTES"),
              http.InferInput("max_tokens", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(data)
    inputs[1].set_data_from_numpy(np.array([[GROUNDING.encode()]], dtype=np.object_))
    inputs[2].set_data_from_numpy(np.array([[8]], dtype=np.int32))
    client = http.InferenceServerClient(triton.http_url)
    try:
        asked = client.infer("kosmos2", inputs, outputs=[http.InferRequestedOutput("entities")])
        raw = asked.as_numpy("entities").reshape(-1)[0].decode()
        assert raw == _direct(kosmos2, sample_image_bytes, GROUNDING, max_tokens=8).extras["entities"]
        assert isinstance(json.loads(raw), list)
        # A client that asks only for the text (an older client) gets the text and nothing else.
        plain = client.infer("kosmos2", inputs, outputs=[http.InferRequestedOutput("generated_text")])
        assert plain.as_numpy("entities") is None and plain.as_numpy("generated_text") is not None
    finally:
        client.close()
    with urllib.request.urlopen(f"http://{triton.http_url}/v2/models/kosmos2", timeout=10) as response:
        outputs = {o["name"]: o["datatype"] for o in json.loads(response.read())["outputs"]}
    assert outputs["entities"] == "BYTES"


def test_models_without_entities_give_an_empty_list(triton: RunningServer, sample_image_bytes: bytes) -> None:
    with TritonVLMClient(triton.grpc_url, protocol="grpc") as client:
        for model in ("llava", "smolvlm"):
            assert client.infer_result(model, sample_image_bytes, "What is this?", max_tokens=2).entities == []


def test_infer_draw_against_the_server(triton: RunningServer, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "house.png"
    code = main(["infer", "--url", triton.http_url, "--model", "moondream2", "--task", "detect",
                 "--image", str(SAMPLE_IMAGE), "--prompt", "house", "--draw", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    boxes = len(json.loads(captured.out)["objects"])
    assert f"drew 1 entity ({boxes} boxes/points)" in captured.err
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    original = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB")).astype(int)
    assert drawn.shape == original.shape
    assert (np.abs(drawn - original).sum(-1) > 30).sum() > (100 if boxes else -1)


def test_smolvlm_is_served_by_its_family_and_on_the_engine(triton: RunningServer, sample_image_bytes: bytes) -> None:
    # Answers equal to direct inference, batched or not: test_server.py (smolvlm is one of WORKING_MODELS); the
    # engine's stream: test_streaming.py.
    with urllib.request.urlopen(f"http://{triton.http_url}/v2/models/smolvlm/config", timeout=10) as response:
        config = json.loads(response.read())
    assert config["parameters"]["model_family"]["string_value"] == "smolvlm"
    assert config["parameters"]["hf_model_id"]["string_value"] == "HuggingFaceTB/SmolVLM-256M-Instruct"
    with TritonVLMClient(triton.grpc_url, protocol="grpc") as client:
        public = client.infer_result("smolvlm", sample_image_bytes, "What is in this image?", max_tokens=4,
                                     ignore_eos=True)
        pieces = list(client.stream_pieces("smolvlm", sample_image_bytes, "What is in this image?", max_tokens=4,
                                           ignore_eos=True))  # through smolvlm_stream, the engine
    assert public.generated_tokens == 4 and public.prompt_tokens > 40  # the image is 2x2 tiles + a global view
    assert "".join(p.text for p in pieces) == public.text and pieces[-1].generated_tokens == 4
    assert re.search(r"loaded model smolvlm \(smolvlm from \S+/tiny/smolvlm-v\d+\)", triton.log())
    assert re.search(r"loaded model smolvlm_stream \(smolvlm from \S+/tiny/smolvlm-v\d+\)", triton.log())
