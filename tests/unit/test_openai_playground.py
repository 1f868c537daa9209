"""The browser playground's routes without Triton: the page and its assets, their headers, the config endpoint,
and which calls the API key guards."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from tests.conftest import ROOT
from tests.unit.test_openai_front import AUTH, KEY, FakeGateway

from triton_vlm.openai import OpenAIOptions
from triton_vlm.openai.app import create_app, refuse_unsupported
from triton_vlm.openai.cli import add_arguments, options_from_args
from triton_vlm.openai.config import MiB
from triton_vlm.openai.playground import ASSETS
from triton_vlm.openai.process import front_command
from triton_vlm.openai.schemas import ChatCompletionRequest

STATIC = ROOT / "src" / "triton_vlm" / "openai" / "static"


@pytest.fixture
def client() -> Iterator[TestClient]:
    options = OpenAIOptions(api_keys=(KEY,), max_image_bytes=3 * MiB, max_body_bytes=5 * MiB)
    with TestClient(create_app(options, FakeGateway())) as test_client:
        yield test_client


@pytest.mark.parametrize("url, media_type", [("/playground", "text/html"), ("/playground/playground.js",
                                                                            "text/javascript"),
                                             ("/playground/playground.css", "text/css")])
def test_page_and_assets_are_served_without_a_key(client: TestClient, url: str, media_type: str) -> None:
    """The shell holds no data: open, like /health. Strict headers: nothing but this origin's own files."""
    response = client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == f"{media_type}; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.content == (STATIC / ASSETS[url][0]).read_bytes()


def test_page_is_self_contained_and_usable_on_a_phone(client: TestClient) -> None:
    html = client.get("/playground").text
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert '<html lang="en">' in html
    # Everything local: no CDN, no inline script or style (the CSP would refuse them anyway).
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert "<script>" not in html and "style=" not in html
    for ref in re.findall(r'(?:src|href)="(playground/[^"]+)"', html):
        assert client.get(f"/{ref}").status_code == 200, ref
    # Every form control has a label.
    ids = set(re.findall(r'<(?:input|select|textarea)[^>]*\bid="([^"]+)"', html))
    assert ids and ids <= set(re.findall(r'<label for="([^"]+)"', html))
    script = client.get("/playground/playground.js").text
    assert "sessionStorage" in script and "localStorage" not in script  # the key lives as long as the tab
    assert "Bearer" in script and "?key=" not in script


def test_config_endpoint_tells_the_limits(client: TestClient) -> None:
    response = client.get("/playground/config.json")  # open: the page needs it before the key
    assert response.status_code == 200
    assert response.json() == {"max_image_bytes": 3 * MiB, "max_body_bytes": 5 * MiB, "api_key_required": True,
                                "remote_images": False}
    assert KEY not in response.text
    with TestClient(create_app(OpenAIOptions(), FakeGateway())) as open_client:
        assert open_client.get("/playground/config.json").json()["api_key_required"] is False


def test_the_data_calls_still_need_the_key(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    # The key is never taken from the URL.
    assert client.get(f"/v1/models?api_key={KEY}").status_code == 401
    assert client.get(f"/playground?key={KEY}").status_code == 200


def test_playground_is_not_part_of_the_api_description(client: TestClient) -> None:
    paths = client.get("/openapi.json", headers=AUTH).json()["paths"]
    assert not [p for p in paths if p.startswith("/playground")]


def test_unknown_playground_files_are_404_and_paths_never_reach_the_disk(client: TestClient) -> None:
    for url in ("/playground/other.js", "/playground/../app.py", "/playground/%2e%2e/app.py",
                "/playground/static/playground.js"):
        assert client.get(url).status_code == 404, url


def test_no_playground_flag(tmp_path: object) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = options_from_args(parser.parse_args(["--no-playground"]))
    assert options.playground is False
    assert "--no-playground" in front_command(options)
    assert "--no-playground" not in front_command(OpenAIOptions())
    with TestClient(create_app(options, FakeGateway())) as test_client:
        assert test_client.get("/playground").status_code == 404
        assert test_client.get("/playground/config.json").status_code == 404


def test_the_wheel_ships_the_page() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["triton_vlm.openai"]
    shipped = {p.name for pattern in patterns for p in STATIC.glob(pattern.removeprefix("static/"))}
    assert {name for name, _ in ASSETS.values()} <= shipped


def test_every_option_of_the_page_has_its_field_and_is_taken_by_the_api() -> None:
    """The page's option list (``OPTIONS`` in playground.js, which both the request and "Copy as code" are built
    from): each entry has its labelled field in the page and names a request field the API accepts (not refused as
    unsupported) with a value of its kind."""
    script, html = (STATIC / "playground.js").read_text(), (STATIC / "playground.html").read_text()
    block = re.search(r"const OPTIONS = \[(.*?)\];", script, flags=re.S)
    assert block is not None
    options = re.findall(r'\{ id: "([^"]+)", key: "([^"]+)", read: "(\w+)"', block.group(1))
    assert {key for _, key, _ in options} >= {"max_tokens", "temperature", "top_p", "seed", "task"}
    samples = {"int": 3, "float": 0.5, "text": "query"}
    for element_id, key, read in options:
        assert f'id="{element_id}"' in html and f'<label for="{element_id}"' in html, element_id
        assert f"  {read}: (text)" in script, read  # a reader of that kind
        body = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], key: samples[read]})
        assert getattr(body, key) == samples[read]
        refuse_unsupported(body)  # raises for what the API refuses
    # The conversation's controls.
    for element_id in ("conversation", "clear", "with-image"):
        assert f'id="{element_id}"' in html
