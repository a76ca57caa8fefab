"""`danlu webui`: the chat handlers on the real model, and the page itself in a real headless Chromium."""
import os
import shutil
import struct
import subprocess
import sys
import time

import httpx
import pytest

import danlu
from danlu.tuning.lora import load_adapter
from tests.serving.conftest import free_port

pytestmark = pytest.mark.real

QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0.0, "top_p": 0.9, "max_new_tokens": 32}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def handlers(real_gguf, adapters):
    from danlu.checkpoints.load import load_pretrained
    from danlu.serving.multi_lora import MultiLoRA
    from danlu.serving.webui import ChatHandlers

    lm = load_pretrained(real_gguf, dtype="float32", device="cpu")  # its own copy: MultiLoRA wraps modules
    h = ChatHandlers(lm, MultiLoRA.load(lm.model, {k: str(v) for k, v in adapters.items()}))
    yield h
    h.close()


def ask(handlers, query, history=(), system=None, adapter="base", **sampling):
    settings = {**GREEDY, **sampling}
    return list(handlers.submit(query, list(history), system, adapter, settings["temperature"], settings["top_p"],
                                settings["max_new_tokens"]))


def test_submit_streams_a_growing_history(handlers, real_lm):
    steps = ask(handlers, QUESTION)
    assert steps[0] == ([{"role": "user", "content": QUESTION}], "")  # the question shows at once, box empties
    assert len(steps) > 3 and all(box == "" for _, box in steps)
    answers = [history[1]["content"] for history, _ in steps[1:]]
    for shorter, longer in zip(answers, answers[1:]):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    final = steps[-1][0]
    assert [m["role"] for m in final] == ["user", "assistant"] and "Paris" in final[1]["content"]
    # "base" is the plain model: the same answer as danlu.chat on a model that never saw an adapter
    assert final[1]["content"] == danlu.chat(real_lm, QUESTION, **GREEDY)


def test_second_turn_takes_gradio_history_format(handlers):
    first = ask(handlers, QUESTION)[-1][0]
    as_gradio_sends_it = [{"role": m["role"], "metadata": None, "options": None,
                           "content": [{"type": "text", "text": m["content"]}]} for m in first]
    final = ask(handlers, "And of Germany?", as_gradio_sends_it)[-1][0]
    assert final[:2] == first and [m["role"] for m in final] == ["user", "assistant", "user", "assistant"]
    assert final[2]["content"] == "And of Germany?" and final[3]["content"]


def test_empty_query_changes_nothing(handlers):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    assert ask(handlers, "   ", history) == [(history, "   ")]


def test_regenerate_replaces_the_last_answer(handlers):
    first = ask(handlers, QUESTION)[-1][0]
    stale = first + [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "STALE"}]
    steps = list(handlers.regenerate(stale, None, "base", *GREEDY.values()))
    assert steps[0] == stale[:3]  # the old answer goes first
    final = steps[-1]
    assert final[:3] == stale[:3] and len(final) == 4 and final[3]["role"] == "assistant"
    assert final[3]["content"] not in ("", "STALE")
    fresh = ask(handlers, "Name a colour.", first)[-1][0]
    assert final == fresh  # the same as asking that question anew
    # a question still without an answer (e.g. after an error) gets one
    assert list(handlers.regenerate(stale[:3], None, "base", *GREEDY.values()))[-1] == fresh


def test_regenerate_samples_anew_at_positive_temperature(handlers):
    history = [{"role": "user", "content": "Write a line of a poem about rain."}, {"role": "assistant", "content": "x"}]
    answers = {list(handlers.regenerate(history, None, "base", 1.0, 1.0, 24))[-1][1]["content"] for _ in range(3)}
    assert len(answers) > 1  # no fixed seed: Regenerate is a new draw


def test_regenerate_and_clear_on_an_empty_chat(handlers):
    assert list(handlers.regenerate([], None, "base", *GREEDY.values())) == [[]]
    assert handlers.clear() == ([], "")


def test_adapter_choice_changes_the_answer(handlers, adapters, real_gguf):
    question = "Tell me about the moon."
    answers = {name: ask(handlers, question, adapter=name, max_new_tokens=20)[-1][0][1]["content"]
               for name in ("base", "user-a", "user-b")}
    assert len(set(answers.values())) == 3
    reference = danlu.load(real_gguf, dtype="float32")
    load_adapter(reference.model, adapters["user-a"])
    assert answers["user-a"] == danlu.chat(reference, question, temperature=0, max_new_tokens=20)
    # switching back needs no reload and leaves nothing of the adapter behind
    assert ask(handlers, question, adapter="base", max_new_tokens=20)[-1][0][1]["content"] == answers["base"]
    with pytest.raises(ValueError, match="unknown adapter"):
        ask(handlers, question, adapter="nope")


def test_system_prompt_is_used(handlers):
    plain = ask(handlers, "Who are you?")[-1][0][1]["content"]
    pirate = ask(handlers, "Who are you?", system="You are Captain Hook, a pirate. Always talk like a pirate.")
    assert pirate[-1][0][1]["content"] != plain
    assert ask(handlers, "Who are you?", system="  ")[-1][0][1]["content"] == plain  # blank = the default


def test_build_webui_wires_the_page(handlers):
    import gradio as gr

    from danlu.serving.webui import build_webui

    demo = build_webui(handlers.lm, handlers.multi_lora)
    try:
        assert isinstance(demo, gr.Blocks) and demo.analytics_enabled is False
        by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        assert {"chatbot", "query", "submit", "regenerate", "clear", "system", "adapter", "temperature", "top_p",
                "max_new_tokens"} <= set(by_id)
        assert [c[1] for c in by_id["adapter"].choices] == ["base", "user-a", "user-b"]
        assert by_id["temperature"].minimum == 0
    finally:
        demo.handlers.close()


def test_cli_options():
    from danlu.cli.main import build_parser

    args = build_parser().parse_args(["webui", "--lora", "a=/x", "--lora", "b=/y", "--template", "chatml"])
    assert (args.host, args.port, args.lora, args.template, args.seed) == ("127.0.0.1", 7860, ["a=/x", "b=/y"],
                                                                            "chatml", None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["webui", "--share"])  # no tunnels


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.browser
def test_chat_in_a_real_browser(tmp_path, adapters):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver: run scripts/setup.sh as root, "
                    "or `apt-get install chromium chromium-driver`")
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = open(tmp_path / "webui.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "danlu.cli.main", "webui", "--port", str(port),
                             "--temperature", "0", "--max_new_tokens", "40", "--lora", f"user-a={adapters['user-a']}"],
                            stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    driver = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            log.seek(0)
            pytest.fail(f"danlu webui did not start:\n{log.read()}")

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(60)
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#query textarea")))
        adapter = driver.find_element(By.CSS_SELECTOR, "#adapter input")
        assert adapter.get_attribute("value") == "base"
        # Shift+Enter breaks the line and sends nothing; Enter sends
        ActionChains(driver).click(box).send_keys("first line").key_down(Keys.SHIFT).send_keys(Keys.ENTER) \
            .key_up(Keys.SHIFT).send_keys("second line").perform()
        time.sleep(1)
        assert box.get_attribute("value") == "first line\nsecond line"
        assert "first line" not in driver.find_element(By.ID, "chatbot").text
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(QUESTION, Keys.ENTER)

        chatbot = driver.find_element(By.ID, "chatbot")
        WebDriverWait(driver, 180, poll_frequency=0.2).until(lambda d: "Paris" in chatbot.text)
        seen_while_streaming = chatbot.text
        stable_since, last = time.time(), chatbot.text
        while time.time() - stable_since < 2.5 and time.time() < deadline + 180:  # until the stream has ended
            time.sleep(0.25)
            if chatbot.text != last:
                stable_since, last = time.time(), chatbot.text
        text = chatbot.text
        assert QUESTION in text and "Paris" in text and text.startswith(seen_while_streaming[:len(QUESTION)])
        assert box.get_attribute("value") == ""  # the question left the box for the chat

        shot = tmp_path / "webui.png"
        assert driver.save_screenshot(str(shot))
        width, height = png_size(shot)
        assert 1000 <= width <= 4000 and 600 <= height <= 4000 and shot.stat().st_size > 20_000
        with Image.open(shot) as image:  # a rendered page, not a blank or single-colour frame
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is None or len(colours) > 50
        if os.environ.get("DANLU_SCREENSHOT_DIR"):
            shutil.copy(shot, os.environ["DANLU_SCREENSHOT_DIR"])

        driver.find_element(By.ID, "clear").click()
        WebDriverWait(driver, 30).until(lambda d: "Paris" not in chatbot.text and QUESTION not in chatbot.text)
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
