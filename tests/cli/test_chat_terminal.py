"""`danlu chat` used as a person would: the real program in a pseudo-terminal (pexpect), on the bundled model.

One chat process is shared by the tests in this module (loading the model takes seconds), so they run in
file order and each one leaves the chat with an empty history and the settings it was started with.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 20  # enough for "The capital of France is Paris." and its end-of-turn token
TIMEOUT = 180  # generous: these machines are sometimes busy
PROMPT = "User> "
QUESTION = "What is the capital of France?"


def _env() -> dict:
    env = dict(os.environ)  # DANLU_HOME, when set, says where the bundled model is
    env["TERM"] = "xterm"
    env["INPUTRC"] = os.devnull  # readline's defaults, whatever the host's ~/.inputrc says
    env.pop("PYTHONSTARTUP", None)
    return env


def _command(*options: str) -> list[str]:
    return [sys.executable, "-m", "danlu.cli.main", "chat", "--temperature", "0", "--max_new_tokens", str(MAX_NEW),
            *options]


def spawn_chat():
    command = _command()
    child = pexpect.spawn(command[0], command[1:], env=_env(), cwd=str(REPO), encoding="utf-8",
                          codec_errors="replace", timeout=TIMEOUT, dimensions=(40, 120))
    child.transcript = []  # everything the chat printed, for failure messages

    class Tee:
        def write(self, text):
            child.transcript.append(text)

        def flush(self):
            pass

    child.logfile_read = Tee()
    return child


def transcript(child, last: int = 3000) -> str:
    return "".join(child.transcript)[-last:]


def expect(child, pattern, exact: bool = True) -> str:
    """Wait for `pattern`; return what came before it (\\r\\n made \\n)."""
    try:
        if exact:
            child.expect_exact(pattern)
        else:
            child.expect(pattern)
    except (pexpect.TIMEOUT, pexpect.EOF) as e:
        raise AssertionError(f"did not see {pattern!r} ({type(e).__name__}); the chat printed:\n"
                             f"{transcript(child)}") from None
    return child.before.replace("\r\n", "\n")


def say(child, line: str) -> str:
    """Type a line and press Enter; return what the chat printed before its next prompt."""
    child.sendline(line)
    return expect(child, PROMPT)


def answer_of(output: str) -> str:
    match = re.search(r"Assistant: (.*)", output, re.S)
    assert match, f"no answer in {output!r}"
    return match.group(1).strip()


@pytest.fixture(scope="module")
def started(real_gguf):
    """The chats that load the model, all started at once: loading takes most of this module's time."""
    query = subprocess.Popen(_command("--query", QUESTION), env=_env(), cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chats = {"main": spawn_chat(), "ctrl-d": spawn_chat(), "query": query}
    yield chats
    for child in (chats["main"], chats["ctrl-d"]):
        if child.isalive():
            child.close(force=True)
    if query.poll() is None:
        query.kill()
        query.communicate()


@pytest.fixture(scope="module")
def chat(started):
    child = started["main"]
    child.banner = expect(child, PROMPT)  # what was printed before the first prompt
    child.first_prompt = child.after
    return child


@pytest.fixture(scope="module")
def asked(chat) -> str:
    """The chat after one question (on an empty history): what it printed."""
    say(chat, ":clh")
    return say(chat, QUESTION)


@pytest.mark.real
def test_welcome_and_prompt(chat):
    assert "Welcome to danlu chat" in chat.banner
    assert ":h for commands" in chat.banner
    assert chat.first_prompt == PROMPT
    assert "Traceback" not in chat.banner


@pytest.mark.real
def test_question_streams_an_answer(asked):
    assert asked.startswith(QUESTION)  # readline's echo of what was typed
    assert "Assistant: " in asked
    assert "Paris" in answer_of(asked)


@pytest.mark.real
def test_history_shows_then_clears(chat, asked):
    out = say(chat, ":his")
    assert "History (1)" in out
    assert f"User[0]: {QUESTION}" in out
    assert re.search(r"Assistant\[0\]: .*Paris", out)

    assert "[INFO] All 1 history cleared" in say(chat, ":clh")
    out = say(chat, ":history")
    assert "History (0)" in out
    assert "User[0]" not in out


@pytest.mark.real
def test_help(chat):
    for line in (":h", ":help"):
        out = say(chat, line)
        assert "Commands:" in out
        for text in (":exit / :quit / :q", ":clear-history / :clh", ":history / :his", ":seed <N>",
                     ":conf <key>=<value>", ":reset-conf"):
            assert text in out
        assert "Assistant:" not in out  # a command, not a question for the model


@pytest.mark.real
def test_seed(chat):
    assert "[INFO] Current random seed: 1234" in say(chat, ":seed")
    assert "[INFO] Random seed changed to 7" in say(chat, ":seed 7")
    assert "[INFO] Current random seed: 7" in say(chat, ":seed")

    out = say(chat, ":seed abc")
    assert "[WARNING] Fail to change random seed" in out and "'abc'" in out
    assert "[INFO] Current random seed: 7" in say(chat, ":seed")

    # answers use the session's seed, so `:conf seed=N` is the same as `:seed N`
    assert "[INFO] Random seed changed to 5" in say(chat, ":conf seed=5")
    assert "[INFO] Current random seed: 5" in say(chat, ":seed")

    assert "[INFO] Random seed changed to 1234" in say(chat, ":seed 1234")


@pytest.mark.real
def test_conf_lists_settings(chat):
    out = say(chat, ":conf")
    for text in (f"max_new_tokens = {MAX_NEW}", "temperature = 0.0", "top_k = 50", "top_p = 0.9",
                 "repetition_penalty = 1.0", "stop = []"):
        assert text in out
    assert "Assistant:" not in out


@pytest.mark.real
def test_conf_max_new_tokens_makes_the_next_answer_short(chat):
    assert "[INFO] Change config: max_new_tokens = 5" in say(chat, ":conf max_new_tokens=5")
    assert "max_new_tokens = 5" in say(chat, ":conf")
    say(chat, ":clh")
    short = answer_of(say(chat, QUESTION))
    assert short and len(short.split()) <= 5
    assert "Paris" not in short  # cut off before the answer ("The capital of France is")

    out = say(chat, ":reset-conf")
    assert "[INFO] Reset generation config" in out and f"max_new_tokens = {MAX_NEW}" in out
    say(chat, ":clh")


@pytest.mark.real
def test_conf_values_are_never_evaluated(chat, tmp_path):
    marker = tmp_path / "pwned"
    out = say(chat, f":conf temperature=__import__('os').system('touch {marker}')")
    time.sleep(0.5)
    assert not marker.exists()
    assert "[WARNING]" in out and "temperature" in out
    assert "Change config" not in out
    assert "temperature = 0.0" in say(chat, ":conf")

    # things ast.literal_eval rejects with other errors than ValueError must not end the chat either
    out = say(chat, ":conf temperature={[1]: 2}")
    assert "[WARNING]" in out and "temperature" in out
    assert chat.isalive()
    assert "temperature = 0.0" in say(chat, ":conf")


@pytest.mark.real
def test_conf_values_may_hold_spaces(chat):
    out = say(chat, ":conf stop=['a b', 'c'] top_k=3")
    assert "[INFO] Change config: stop = ['a b', 'c']" in out
    assert "[INFO] Change config: top_k = 3" in out
    assert "[WARNING]" not in out
    say(chat, ":reset-conf")


@pytest.mark.real
def test_conf_rejects_unknown_settings(chat):
    out = say(chat, ":conf nosuch=1")
    assert "[WARNING]" in out and "nosuch" in out
    assert "Change config" not in out
    assert "nosuch" not in say(chat, ":conf")

    assert "[WARNING] format: <key>=<value>" in say(chat, ":conf max_new_tokens")


@pytest.mark.real
def test_reset_conf(chat):
    out = say(chat, ":conf top_k=3 max_new_tokens=7 temperature=0.5")
    assert out.count("[INFO] Change config") == 3
    out = say(chat, ":reset-conf")
    assert "[INFO] Reset generation config" in out
    for text in (f"max_new_tokens = {MAX_NEW}", "temperature = 0.0", "top_k = 50"):
        assert text in out
    assert "top_k = 50" in say(chat, ":conf")


@pytest.mark.real
def test_tab_completes_commands(chat):
    # one match: `:clear-h` TAB becomes `:clear-history`; Enter runs it (as typed, it would go to the model)
    chat.send(":clear-h\t")
    expect(chat, "istory")  # readline writes the rest of the word
    chat.send("\r")
    out = expect(chat, PROMPT)
    assert re.search(r"\[INFO\] All \d+ history cleared", out)
    assert "Assistant:" not in out

    # two matches (:clear, :clear-history): TAB writes their common part, `:clear`, which clears the screen
    chat.send(":cle\t")
    expect(chat, "ar")
    chat.send("\r")
    out = expect(chat, PROMPT)
    assert "\x1b[2J" in out and "Welcome to danlu chat" in out
    assert "Assistant:" not in out


@pytest.mark.real
def test_ctrl_c_stops_the_answer_not_the_chat(chat):
    say(chat, ":clh")
    assert "max_new_tokens = 400" in say(chat, ":conf max_new_tokens=400")
    chat.sendline("Tell me a long story about a dragon.")
    expect(chat, "Assistant: ")
    expect(chat, r"\w+", exact=False)  # the first streamed words
    chat.sendintr()
    out = expect(chat, PROMPT)
    assert "[WARNING] Generation interrupted" in out
    assert chat.isalive()

    say(chat, ":reset-conf")
    assert "Paris" in answer_of(say(chat, QUESTION))  # the chat still answers
    say(chat, ":clh")


@pytest.mark.real
def test_ctrl_c_at_the_prompt_does_not_exit(chat):
    chat.sendintr()
    out = expect(chat, PROMPT)
    assert "Ctrl-C stops an answer" in out
    assert chat.isalive()
    assert "Current random seed" in say(chat, ":seed")


@pytest.mark.real
def test_too_long_a_message_does_not_end_the_chat(chat):
    out = say(chat, "hi " * 8300)  # more tokens than SmolLM2's context of 8192
    assert "[ERROR]" in out and "does not fit the context" in out
    assert chat.isalive()
    assert "History (0)" in say(chat, ":his")


def assert_clean_exit(child) -> None:
    expect(child, pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, transcript(child)
    assert "Traceback" not in transcript(child)


@pytest.mark.real
def test_q_exits_with_status_0(chat):
    chat.sendline(":q")
    assert_clean_exit(chat)


@pytest.mark.real
def test_ctrl_d_exits_with_status_0(started):
    child = started["ctrl-d"]  # a chat of its own, as this one leaves
    expect(child, PROMPT)
    child.sendeof()
    assert_clean_exit(child)


@pytest.mark.real
def test_query_answers_once_and_exits(started):
    query = started["query"]  # `danlu chat --query ...`, not in a terminal, started with the others
    stdout, stderr = query.communicate(timeout=TIMEOUT)
    assert query.returncode == 0, stderr
    assert f"User: {QUESTION}" in stdout
    assert "Paris" in answer_of(stdout)
    assert "User>" not in stdout  # no interactive prompt
    assert "Traceback" not in stderr


@pytest.mark.real
def test_missing_model_is_a_clean_error():
    result = subprocess.run(_command("--model", "/nonexistent/x.gguf", "--query", "hi"), env=_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "/nonexistent/x.gguf" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
