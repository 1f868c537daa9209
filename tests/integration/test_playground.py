"""The browser playground in headless Chromium (Selenium), against the session's front and tritonserver (tiny
weights): the API key asked for on a 401, an image uploaded, answers streamed in with their latency, moondream2's
detect boxes and kosmos2's grounded phrases drawn over the image, errors in plain words, and a send by keyboard only.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (``make install`` brings them
where it runs as root). Without them these tests skip on a dev machine, and fail under CI=true.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import SAMPLE_IMAGE
from tests.integration.conftest import API_KEY, WORKING_MODELS, Front, RunningServer

from triton_client import TritonVLMClient

pytestmark = pytest.mark.integration

#: A folder to save pictures of the page in (docs/images/playground.png is made this way).
SCREENSHOT_ENV = "TRITON_VLM_PLAYGROUND_SCREENSHOTS"
WAIT_S = 120


def _browser_or_skip() -> tuple[str, str]:
    """Chromium and chromedriver, or a skip (a failure under CI=true) that says what is missing and how to get it."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install selenium; the 'test' extra)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None:
        missing.append("chromium (apt-get install chromium)")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        reason = "browser tests need " + ", ".join(missing) + "; `make install` as root installs them"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    assert browser is not None and driver is not None
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--force-device-scale-factor=1", "--lang=en-US",
                     "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


# -- helpers ---------------------------------------------------------------------------------------------------
def _wait(driver: Any, condition: Any, timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def _by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _enter_key(driver: Any, key: str) -> None:
    _wait(driver, lambda d: d.execute_script("return document.getElementById('key-dialog').open"))
    field = _by_id(driver, "key-input")
    field.clear()
    field.send_keys(key)
    _by_id(driver, "key-save").click()


def _models(driver: Any) -> list[str]:
    return driver.execute_script("return [...document.getElementById('model').options].map(o => o.value)")


def open_page(driver: Any, front: Front) -> None:
    """The page, with the key entered where the tab does not have it yet; returns once the models are listed."""
    driver.get(front.root + "/playground")
    _wait(driver, lambda d: _models(d) or d.execute_script("return document.getElementById('key-dialog').open"))
    if not _models(driver):
        _enter_key(driver, API_KEY)
        _wait(driver, lambda d: _models(d))


def choose(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(_by_id(driver, element_id)).select_by_value(value)


def fill(driver: Any, element_id: str, text: str) -> None:
    field = _by_id(driver, element_id)
    field.clear()
    field.send_keys(text)


def upload(driver: Any, path: Path) -> None:
    _by_id(driver, "file").send_keys(str(path))


#: The last answer of the conversation and the error shown in its turn.
LAST_TURN = """
    const turns = document.querySelectorAll('#conversation .turn.assistant');
    const last = turns[turns.length - 1];
    return last ? [last.querySelector('.answer').textContent, last.querySelector('.turn-error').textContent]
                : ['', ''];"""


def wait_for_answer(driver: Any) -> dict[str, str]:
    """Waits for the end of the answer (or an error); the last turn's answer, the figures shown, and the error (the
    failed turn's, or the page's)."""
    _wait(driver, lambda d: not _by_id(d, "send").get_attribute("disabled") and (
        _by_id(d, "total").text != "–" or d.execute_script(LAST_TURN)[1] or _by_id(d, "error").is_displayed()))
    answer, turn_error = driver.execute_script(LAST_TURN)
    shown = {name: _by_id(driver, name).text for name in ("ttft", "total", "tokens", "tps", "error")}
    return {**shown, "answer": answer, "error": turn_error or shown["error"]}


def overlay(driver: Any) -> list[dict[str, Any]]:
    """Each group drawn over the image: its label, its boxes and points, the label text shown."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#overlay g.entity')].map(g => ({
            label: g.dataset.label, boxes: g.querySelectorAll('rect.box').length,
            points: g.querySelectorAll('circle.point').length,
            texts: [...g.querySelectorAll('text.label')].map(t => t.textContent)}));""")


def screenshot(driver: Any, name: str) -> None:
    """Saves the page as ``playground-NAME.png`` in $TRITON_VLM_PLAYGROUND_SCREENSHOTS, where that is set."""
    folder = os.environ.get(SCREENSHOT_ENV)
    if folder:
        driver.execute_script("window.scrollTo(0, 0); document.activeElement.blur()")
        driver.save_screenshot(str(Path(folder) / f"playground-{name}.png"))


def _seconds(text: str) -> float:
    value, unit = text.split()[:2]
    return float(value) / (1000 if unit == "ms" else 1)


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "sample_image.jpg"
    shutil.copy(SAMPLE_IMAGE, path)
    return path


# -- the tests ---------------------------------------------------------------------------------------------------
def test_the_key_is_asked_for_on_a_401_and_kept_for_the_tab(browser: Any, front: Front) -> None:
    browser.get(front.root + "/playground")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    _enter_key(browser, "sk-wrong")  # the models call answered 401: the page asks
    _wait(browser, lambda d: "refused" in _by_id(d, "key-message").text)
    _enter_key(browser, API_KEY)
    _wait(browser, lambda d: _models(d))
    assert sorted(_models(browser)) == sorted(WORKING_MODELS)
    assert browser.execute_script("return sessionStorage.getItem('triton-vlm-api-key')") == API_KEY
    assert API_KEY not in browser.current_url
    browser.refresh()  # same tab: no second prompt
    _wait(browser, lambda d: _models(d))
    assert not browser.execute_script("return document.getElementById('key-dialog').open")


def moondream2_answer(triton: RunningServer, jpeg: Path, prompt: str, task: str) -> tuple[str, list[Any]]:
    """What the server itself answers (through Triton's own API), and its objects or points: never empty, so the
    drawing checked below is a real one."""
    with TritonVLMClient(triton.http_url) as kserve:
        answer = kserve.infer("moondream2", jpeg.read_bytes(), prompt, task=task, max_tokens=12)
    found = json.loads(answer)["objects" if task == "detect" else "points"]
    assert found, f"the tiny moondream2 found nothing for {prompt!r}: pick another prompt for a non-empty case"
    return answer, found


def test_moondream2_detect_by_keyboard_only_draws_its_boxes(browser: Any, front: Front, triton: RunningServer,
                                                           jpeg: Path) -> None:
    """Everything after the file pick by keyboard: Tab through the fields in order, type, Enter sends."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    expected, objects = moondream2_answer(triton, jpeg, "house", "detect")

    open_page(browser, front)
    upload(browser, jpeg)
    _wait(browser, lambda d: _by_id(d, "stage").is_displayed())
    assert "640×480" in _by_id(browser, "image-info").text
    browser.execute_script("document.activeElement.blur(); window.focus()")
    keys = ActionChains(browser)
    visited = []
    for _ in range(8):  # the key button, the image picker, then the model
        keys.send_keys(Keys.TAB).perform()
        visited.append(browser.execute_script("return document.activeElement.id"))
        if visited[-1] == "model":
            break
    assert visited == ["key-button", "file", "model"], visited
    outline = browser.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid", "keyboard focus must be visible"
    ActionChains(browser).send_keys("moondream2").perform()
    assert _by_id(browser, "model").get_attribute("value") == "moondream2"
    ActionChains(browser).send_keys(Keys.TAB, "detect").perform()
    assert _by_id(browser, "task").get_attribute("value") == "detect"
    ActionChains(browser).send_keys(Keys.TAB).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL) \
        .send_keys("12", Keys.TAB, "house").perform()
    assert browser.execute_script("return document.activeElement.id") == "prompt"
    ActionChains(browser).send_keys(Keys.ENTER).perform()

    shown = wait_for_answer(browser)
    assert not shown["error"], shown["error"]
    assert shown["answer"] == expected
    assert _seconds(shown["ttft"]) > 0 and _seconds(shown["total"]) >= _seconds(shown["ttft"])
    # moondream2's detect counts no generated tokens: no rate then (llava's test checks the rate).
    assert (shown["tokens"], shown["tps"]) == ("0", "–") or float(shown["tps"]) > 0
    (group,) = overlay(browser)
    assert group == {"label": "house", "boxes": len(objects), "points": 0, "texts": ["house"]}
    legend = _by_id(browser, "legend").text
    assert f"house — {len(objects)} box" in legend
    assert "house" in _by_id(browser, "code-curl").get_attribute("textContent")
    screenshot(browser, "moondream2")


def test_moondream2_point_draws_its_points(browser: Any, front: Front, triton: RunningServer, jpeg: Path) -> None:
    expected, points = moondream2_answer(triton, jpeg, "window", "point")
    open_page(browser, front)
    upload(browser, jpeg)
    choose(browser, "model", "moondream2")
    choose(browser, "task", "point")
    fill(browser, "max-tokens", "12")
    fill(browser, "prompt", "window")
    _by_id(browser, "send").click()
    shown = wait_for_answer(browser)
    assert not shown["error"], shown["error"]
    assert shown["answer"] == expected
    assert overlay(browser) == [{"label": "window", "boxes": 0, "points": len(points), "texts": ["window"]}]


def test_llava_streams_token_by_token_with_latency(browser: Any, front: Front, triton: RunningServer,
                                                   jpeg: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    with TritonVLMClient(triton.http_url) as kserve:
        expected = kserve.infer_result("llava", jpeg.read_bytes(), "Describe it.", max_tokens=12)
    open_page(browser, front)
    upload(browser, jpeg)
    choose(browser, "model", "llava")
    fill(browser, "max-tokens", "12")
    fill(browser, "prompt", "Describe it.")
    # Every text the answer box shows on the way: several, as the pieces come in.
    browser.execute_script("""
        window.__seen = [];
        const conversation = document.getElementById('conversation');
        new MutationObserver(() => window.__seen.push([...conversation.querySelectorAll('.answer')].pop().textContent))
            .observe(conversation, {childList: true, characterData: true, subtree: true});""")
    _by_id(browser, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)  # Ctrl+Enter sends too
    shown = wait_for_answer(browser)
    assert not shown["error"], shown["error"]
    assert shown["answer"] == expected.text
    assert int(shown["tokens"]) == expected.generated_tokens
    assert float(shown["tps"]) > 0 and _seconds(shown["ttft"]) <= _seconds(shown["total"])
    partial = [text for text in browser.execute_script("return window.__seen") if text and text != expected.text]
    assert partial, "the answer appeared all at once: llava streams through llava_stream"
    assert all(expected.text.startswith(text) for text in partial)
    assert overlay(browser) == []


def test_kosmos2_grounded_phrases_are_drawn_and_marked(browser: Any, front: Front, triton: RunningServer,
                                                       jpeg: Path) -> None:
    """kosmos2 through the page, its stream carrying the entities extension on the last chunk. The tiny random
    weights tag no phrase (and greedy, say nothing), so the page's fetch is wrapped to put two known phrases and
    their boxes into that last chunk, where the server puts real ones: the drawing and the marking are then
    checked exactly."""
    prompt = "<grounding>An image of"
    with TritonVLMClient(triton.http_url) as kserve:
        expected = kserve.infer_result("kosmos2", jpeg.read_bytes(), prompt, max_tokens=12)
    assert expected.entities == []
    extra = " a snowman by the fire"
    text = expected.text + extra
    snowman, fire = text.index("a snowman"), text.index("the fire")
    entities = [
        {"phrase": "a snowman", "span": [snowman, snowman + 9],
         "boxes": [{"x_min": 0.3, "y_min": 0.2, "x_max": 0.7, "y_max": 0.9}],
         "boxes_px": [{"x_min": 192, "y_min": 96, "x_max": 448, "y_max": 432}]},
        {"phrase": "the fire", "span": [fire, fire + 8],
         "boxes": [{"x_min": 0.05, "y_min": 0.6, "x_max": 0.25, "y_max": 0.95},
                   {"x_min": 0.8, "y_min": 0.6, "x_max": 0.95, "y_max": 0.95}],
         "boxes_px": [{"x_min": 32, "y_min": 288, "x_max": 160, "y_max": 456},
                      {"x_min": 512, "y_min": 288, "x_max": 608, "y_max": 456}]},
    ]
    open_page(browser, front)
    browser.execute_script("""
        const [extra, entities] = arguments, realFetch = window.fetch.bind(window);
        window.__grounded = false;
        window.fetch = async (url, options) => {
            const response = await realFetch(url, options);
            if (!String(url).includes('chat/completions') || !response.ok) return response;
            const real = await response.text();
            const last = '"delta": {"entities": []}';  // the server's last chunk for a model with entities
            window.__grounded = real.includes(last);
            const body = real.replace(last, '"delta": ' + JSON.stringify({content: extra, entities}));
            return new Response(body, {status: response.status, headers: response.headers});
        };""", extra, entities)
    upload(browser, jpeg)
    choose(browser, "model", "kosmos2")
    assert _by_id(browser, "task").get_attribute("disabled")  # kosmos2 has no task input
    fill(browser, "max-tokens", "12")
    fill(browser, "prompt", prompt)
    _by_id(browser, "send").click()
    shown = wait_for_answer(browser)
    assert not shown["error"], shown["error"]
    assert browser.execute_script("return window.__grounded"), "no entities on the stream's last chunk"
    assert shown["answer"] == text
    assert overlay(browser) == [
        {"label": "a snowman", "boxes": 1, "points": 0, "texts": ["a snowman"]},
        {"label": "the fire", "boxes": 2, "points": 0, "texts": ["the fire"]},
    ]
    marks = browser.execute_script("return [...document.querySelectorAll('#conversation .turn:last-child .answer mark')].map(m => m.textContent)")
    assert marks == ["a snowman", "the fire"]
    assert "the fire — 2 boxes" in _by_id(browser, "legend").text
    _by_id(browser, "code").click()  # the "Copy as code" panel
    python = _by_id(browser, "code-openai").text
    assert 'model="kosmos2"' in python and "message.entities" in python and API_KEY not in python
    screenshot(browser, "kosmos2")


def test_errors_are_shown_in_plain_words(browser: Any, front: Front, jpeg: Path, tmp_path: Path) -> None:
    open_page(browser, front)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    upload(browser, text_file)
    _wait(browser, lambda d: "is not an image" in _by_id(d, "error").text)
    assert not _by_id(browser, "stage").is_displayed()

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    upload(browser, broken)
    _wait(browser, lambda d: "not an image this browser can read" in _by_id(d, "error").text)

    big = tmp_path / "big.png"  # over the front's --max-image-mb (1 MiB here): refused before any upload
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(front.options.max_image_bytes + 1000))
    upload(browser, big)
    _wait(browser, lambda d: "this server takes images up to 1.0 MB" in _by_id(d, "error").text)

    _by_id(browser, "send").click()  # no image yet
    _wait(browser, lambda d: "Add an image first" in _by_id(d, "error").text)

    upload(browser, jpeg)  # a good image, and a token limit over the model's: the server's 400, explained
    _wait(browser, lambda d: _by_id(d, "stage").is_displayed())
    choose(browser, "model", "moondream2")
    fill(browser, "max-tokens", "5000")
    fill(browser, "prompt", "What is this?")
    _by_id(browser, "send").click()
    shown = wait_for_answer(browser)
    assert shown["error"].startswith("The server refused the request:") and "max_tokens" in shown["error"]
    assert _by_id(browser, "send").is_enabled()


def test_a_conversation_about_one_image_a_text_only_turn_and_its_code(browser: Any, front: Front,
                                                                      triton: RunningServer, jpeg: Path) -> None:
    """Two questions about one image: the second request holds the first question with the image and the first
    answer, and is answered as TritonVLMClient.chat answers the same conversation. "Copy as code" then gives that
    request with its options, and the Python and curl snippets answer the same against the front. After "New
    conversation", a turn without the image is a text-only chat."""
    open_page(browser, front)
    browser.execute_script("""
        const realFetch = window.fetch.bind(window);
        window.__sent = [];
        window.fetch = (url, options) => {
            if (String(url).includes('chat/completions')) window.__sent.push(JSON.parse(options.body));
            return realFetch(url, options);
        };""")
    upload(browser, jpeg)
    _wait(browser, lambda d: _by_id(d, "stage").is_displayed())
    choose(browser, "model", "llava")
    fill(browser, "max-tokens", "8")
    browser.find_element("css selector", "#more summary").click()  # the sampling options
    fill(browser, "temperature", "0")
    fill(browser, "seed", "7")
    answers = []
    for question in ("What is this?", "And its colour?"):
        fill(browser, "prompt", question)
        _by_id(browser, "send").click()
        shown = wait_for_answer(browser)
        assert not shown["error"], shown["error"]
        answers.append(shown["answer"])
    first, second = browser.execute_script("return window.__sent")
    image_url = first["messages"][0]["content"][1]["image_url"]["url"]
    assert base64.b64decode(image_url.split(",", 1)[1]) == jpeg.read_bytes()
    asked = {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}
    assert first["messages"] == [asked]
    assert second["messages"] == [asked, {"role": "assistant", "content": answers[0]},
                                  {"role": "user", "content": "And its colour?"}]
    assert {k: second[k] for k in ("model", "max_tokens", "temperature", "seed")} == {
        "model": "llava", "max_tokens": 8, "temperature": 0, "seed": 7}
    turns = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]},
             *second["messages"][1:]]
    with TritonVLMClient(triton.http_url) as kserve:
        expected = kserve.chat_result("llava", turns, [jpeg.read_bytes()], max_tokens=8, temperature=0, seed=7)
    assert answers[1] == expected.text
    assert len(browser.find_elements("css selector", "#conversation .turn")) == 4

    # Copy as code, prompt empty: the last request, whole conversation and options, runnable as it is.
    _by_id(browser, "code").click()
    python = _by_id(browser, "code-openai").get_attribute("textContent")
    assert "max_tokens=8, temperature=0, seed=7" in python and API_KEY not in python
    assert f'"content": {json.dumps(answers[0], ensure_ascii=False)}' in python and '"content": "And its colour?"' in python
    environment = {**os.environ, "TRITON_VLM_API_KEY": API_KEY, "PYTHONIOENCODING": "utf-8"}
    ran = subprocess.run([sys.executable, "-c", python], cwd=jpeg.parent, env=environment, capture_output=True,
                         encoding="utf-8", timeout=WAIT_S)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == expected.text + "\n"
    curl = _by_id(browser, "code-curl").get_attribute("textContent")
    assert "base64 -w0 sample_image.jpg" in curl and '"seed":7' in curl
    if shutil.which("curl"):
        ran = subprocess.run(["bash", "-c", curl], cwd=jpeg.parent, env=environment, capture_output=True,
                             encoding="utf-8", timeout=WAIT_S)
        assert json.loads(ran.stdout)["choices"][0]["message"]["content"] == expected.text, ran.stderr

    # A new conversation, and a turn without the image: a text-only chat.
    _by_id(browser, "clear").click()
    assert not browser.find_elements("css selector", "#conversation .turn")
    _by_id(browser, "with-image").click()
    fill(browser, "prompt", "Say something nice.")
    _by_id(browser, "send").click()
    shown = wait_for_answer(browser)
    assert not shown["error"], shown["error"]
    text_only = browser.execute_script("return window.__sent")[-1]
    assert text_only["messages"] == [{"role": "user", "content": "Say something nice."}]
    with TritonVLMClient(triton.http_url) as kserve:
        expected = kserve.chat_result("llava", text_only["messages"], max_tokens=8, temperature=0, seed=7)
    assert shown["answer"] == expected.text
    screenshot(browser, "conversation")
