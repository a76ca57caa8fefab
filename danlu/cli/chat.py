"""`danlu chat`: streaming interactive chat with the commands of Qwen2's cli_demo.

Commands: :help :h, :exit :quit :q, :clear :cl, :clear-history :clh, :history :his, :seed [N],
:conf [key=value ...], :reset-conf. Values after `:conf key=` are parsed as Python literals, never evaluated.
Ctrl-C stops the answer being written; Ctrl-D or :q leaves.
"""
from __future__ import annotations

import ast
import re
import shutil
import signal
import sys

from danlu.cli.common import (add_compile_option, add_config_argument, add_model_options, add_sampling_options,
                              decoding_of, load_from_args, sampling_config)
from danlu.generation.sampling import GenerationConfig

WELCOME = ("Welcome to danlu chat. Type a message to chat, :h for commands, :q or Ctrl-D to leave.\n"
           "(欢迎使用丹炉对话，输入内容即可对话，:h 显示命令帮助。)")
HELP = """\
Commands:
    :help / :h              Show this help message              显示帮助信息
    :exit / :quit / :q      Exit the chat                       退出
    :clear / :cl            Clear screen                        清屏
    :clear-history / :clh   Clear history                       清除对话历史
    :history / :his         Show history                        显示对话历史
    :seed                   Show current random seed            显示当前随机种子
    :seed <N>               Set random seed to <N>              设置随机种子
    :conf                   Show current generation config      显示生成配置
    :conf <key>=<value>     Change generation config            修改生成配置
    :reset-conf             Reset generation config             重置生成配置"""
COMMANDS = ["help", "h", "exit", "quit", "q", "clear", "cl", "clear-history", "clh", "history", "his",
            "seed", "conf", "reset-conf"]
# In `:conf a=1 b=[1, 2]` a new pair starts only at a word of the form `key=`, so a value may hold spaces.
_PAIR_START = re.compile(r"\s+(?=[A-Za-z_]\w*=)")


def add_parser(sub, name):
    parser = sub.add_parser(name, help="interactive streaming chat (or one answer with --query)")
    add_config_argument(parser)
    add_model_options(parser)
    add_sampling_options(parser, GenerationConfig())
    add_compile_option(parser)
    parser.add_argument("--query", "-q", default=None, help="ask one question, stream the answer and exit")
    parser.set_defaults(run=run)
    return parser


class ChatSession:
    """The state of one chat: history, seed and generation settings; `handle` takes each input line."""

    def __init__(self, lm, config: GenerationConfig, template=None, system=None, out=None,
                 decoding: str = "dynamic"):
        self.lm = lm
        self.decoding = decoding
        self.template = template
        self.system = system
        self.initial_config = config
        self.config = config
        self.seed = config.seed if config.seed is not None else 1234
        self.history: list[tuple[str, str]] = []
        self.out = out if out is not None else sys.stdout

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def handle(self, line: str) -> bool:
        """Act on one input line; False means leave."""
        line = line.strip()
        if not line:
            self.say("[ERROR] Query is empty")
            return True
        if line.startswith(":"):
            words = line[1:].split()
            command = words[0] if words else ""
            if command in COMMANDS:
                return self.command(command, words[1:], line[1:].lstrip()[len(command):].strip())
        self.answer(line)
        return True

    def command(self, command: str, args: list[str], rest: str = "") -> bool:
        if command in ("exit", "quit", "q"):
            return False
        if command in ("help", "h"):
            self.say(HELP)
        elif command in ("clear", "cl"):
            self.say("\033[2J\033[H", end="")
            self.say(WELCOME)
        elif command in ("clear-history", "clh"):
            self.say(f"[INFO] All {len(self.history)} history cleared")
            self.history.clear()
        elif command in ("history", "his"):
            self.show_history()
        elif command == "seed":
            self.set_seed(args)
        elif command == "conf":
            self.change_config(rest)
        elif command == "reset-conf":
            self.config = self.initial_config
            self.say("[INFO] Reset generation config")
            self.show_config()
        return True

    def show_history(self) -> None:
        width = shutil.get_terminal_size((80, 20)).columns
        self.say(f"History ({len(self.history)})".center(width, "="))
        for i, (query, response) in enumerate(self.history):
            self.say(f"User[{i}]: {query}")
            self.say(f"Assistant[{i}]: {response}")
        self.say("=" * width)

    def set_seed(self, args: list[str]) -> None:
        if not args:
            self.say(f"[INFO] Current random seed: {self.seed}")
            return
        try:
            self.seed = int(args[0])
        except ValueError:
            self.say(f"[WARNING] Fail to change random seed: {args[0]!r} is not a valid number")
            return
        self.say(f"[INFO] Random seed changed to {self.seed}")

    def show_config(self) -> None:
        for key, value in self.config.to_dict().items():
            if key != "seed":
                self.say(f"  {key} = {value!r}")

    def change_config(self, text: str) -> None:
        if not text.strip():
            self.show_config()
            return
        for pair in _PAIR_START.split(text.strip()):
            key, eq, text = pair.partition("=")
            if not eq:
                self.say("[WARNING] format: <key>=<value>")
                continue
            if key == "seed":  # answers use the session's seed, so this is `:seed <N>`
                self.set_seed([text])
                continue
            try:
                value = ast.literal_eval(text)  # literals only: never runs code, whatever the text
            except Exception:  # ValueError, SyntaxError, TypeError ({[1]: 2}), RecursionError, MemoryError
                value = text  # a bare word is a string, e.g. stop=###
            if key == "stop" and isinstance(value, str):
                value = [value]
            try:
                self.config = self.config.updated(**{key: value})
            except (ValueError, TypeError) as e:
                self.say(f"[WARNING] {e}")
                continue
            self.say(f"[INFO] Change config: {key} = {value!r}")

    def messages(self, query: str) -> list[dict]:
        messages = []
        for q, r in self.history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        return messages + [{"role": "user", "content": query}]

    def answer(self, query: str) -> None:
        from danlu.generation.pipeline import chat

        self.say("Assistant: ", end="")
        pieces: list[str] = []
        try:
            for piece in chat(self.lm, self.messages(query), template=self.template, system=self.system,
                              stream_output=True, config=self.config.updated(seed=self.seed),
                              decoding=self.decoding):
                pieces.append(piece)
                self.say(piece, end="")
        except KeyboardInterrupt:
            self.say("\n[WARNING] Generation interrupted")
            return
        self.say()
        self.history.append((query, "".join(pieces)))


def _setup_readline() -> None:
    try:
        import readline
    except ImportError:
        return
    matches: list[str] = []

    def complete(text: str, state: int):
        nonlocal matches
        if state == 0:
            word = text.lstrip(":")
            matches = [":" + c if text.startswith(":") else c for c in COMMANDS if c.startswith(word)]
        return matches[state] if state < len(matches) else None

    readline.set_completer_delims(" \t\n")
    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")


def run(args) -> int:
    from danlu.generation.generate import ContextOverflow

    config = sampling_config(args)
    lm = load_from_args(args)
    if lm.tokenizer is None:
        raise ValueError(f"{lm.source} has no tokenizer; chat needs a checkpoint with one")
    session = ChatSession(lm, config, args.template, args.system, decoding=decoding_of(args))
    if args.query is not None:
        print(f"User: {args.query}")
        session.answer(args.query)
        return 0
    _setup_readline()
    # Ctrl-C stops an answer even when the shell that started us ignores SIGINT (a job started with `&`
    # inherits SIG_IGN, which Python would otherwise keep)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(WELCOME)
    while True:
        try:
            line = input("User> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n[INFO] Ctrl-C stops an answer; type :q or press Ctrl-D to leave")
            continue
        except UnicodeDecodeError:
            print("[ERROR] Encoding error in input")
            continue
        try:
            if not session.handle(line):
                return 0
        except ContextOverflow as e:  # a long paste or history: the session and its history stay
            print(f"\n[ERROR] {e}; :clh clears the history")
