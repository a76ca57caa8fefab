"""`danlu webui`: a chat page in the browser (gradio), laid out like Qwen2's web_demo.py.

A Chatbot, a text box, Submit / Regenerate / Clear History, a system prompt, sampling controls and the choice
of a LoRA adapter. Adapters sit beside the one base model (`MultiLoRA`), so switching needs no reload.

The handlers are plain methods of `ChatHandlers` (history in, history out, in gradio's "messages" format), so
they are tested without a browser; `build_webui` only wires them to gradio components.

The page is a client of the same engine as `danlu api` (serving/engine.py): each answer is a request of its own,
so several browser tabs are decoded together in one batch, each with its own adapter and sampling settings.
"""
from __future__ import annotations

import os
import queue
from pathlib import Path
from typing import Iterator, Optional, Sequence

from danlu.generation.sampling import GenerationConfig
from danlu.serving.engine import Engine, Request
from danlu.tokenization.chat import encode_chat, stop_words

BASE = "base"  # the adapter choice meaning "no adapter"


def message_text(content) -> str:
    """The text of a chat message's content: a string, or gradio's list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return str(content)


def normalize_history(history: Optional[Sequence]) -> list[dict]:
    """gradio's chatbot value as [{"role": "user"|"assistant", "content": str}, ...]."""
    out = []
    for message in history or []:
        if isinstance(message, dict):
            role, content = message.get("role"), message.get("content")
        else:  # an object with attributes (gradio's Message)
            role, content = getattr(message, "role", None), getattr(message, "content", None)
        if role in ("user", "assistant"):
            out.append({"role": role, "content": message_text(content)})
    return out


class ChatHandlers:
    """The chat page's actions; each streaming one yields the whole chat history after every new piece."""

    def __init__(self, lm, multi_lora=None, template: Optional[str] = None,
                 config: Optional[GenerationConfig] = None, max_batch: int = 8):
        if lm.tokenizer is None:
            raise ValueError(f"{lm.source} has no tokenizer; the web chat needs a checkpoint with one")
        self.lm = lm
        self.multi_lora = multi_lora
        self.template = template
        self.config = config or GenerationConfig()
        names = list(multi_lora.names) if multi_lora is not None else []
        if BASE in names:
            raise ValueError(f"an adapter may not be called {BASE!r}: that name means the base model")
        self.adapters = [BASE] + names
        self.stops = stop_words(lm.tokenizer, template)
        self.engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, adapters=multi_lora).start()

    def answer(self, messages: list[dict], system: Optional[str] = None, adapter: Optional[str] = BASE,
               temperature: Optional[float] = None, top_p: Optional[float] = None,
               max_new_tokens: Optional[int] = None) -> Iterator[str]:
        """Stream the answer to `messages` (ending with a user turn) as text pieces."""
        adapter = adapter or BASE
        if adapter not in self.adapters:
            raise ValueError(f"unknown adapter {adapter!r}; choose from {self.adapters}")
        sampling = {"temperature": None if temperature is None else float(temperature),
                    "top_p": None if top_p is None else float(top_p),
                    "max_new_tokens": None if max_new_tokens is None else int(max_new_tokens)}
        config = self.config.updated(**{k: v for k, v in sampling.items() if v is not None}).with_stops(self.stops)
        system = system if system and system.strip() else None
        prompt = encode_chat(self.lm.tokenizer, messages, self.template, system)
        events: queue.Queue = queue.Queue()
        request = self.engine.submit(Request(prompt, config, events.put, None if adapter == BASE else adapter))
        try:
            while True:
                event = events.get()
                if event.text:
                    yield event.text
                if event.finish_reason == "error":
                    raise RuntimeError(f"generation failed: {event.error}")
                if event.finish_reason is not None:
                    return
        finally:
            self.engine.abort(request)  # a closed stream (page left, new request) frees the slot at the next step

    def _stream_reply(self, history: list[dict], *settings) -> Iterator[list[dict]]:
        """`history` ends with a user turn: append the assistant's answer, yielding it as it grows."""
        messages = [dict(m) for m in history]
        reply = {"role": "assistant", "content": ""}
        shown = False
        for piece in self.answer(messages, *settings):
            reply["content"] += piece
            shown = True
            yield history + [dict(reply)]
        if not shown:  # an empty answer still shows as a turn
            yield history + [dict(reply)]

    def submit(self, query: str, history, system: Optional[str] = None, adapter: Optional[str] = BASE,
               temperature: Optional[float] = None, top_p: Optional[float] = None,
               max_new_tokens: Optional[int] = None) -> Iterator[tuple[list[dict], str]]:
        """Ask `query`: yields (history, text box value) — the box empties once the question is taken."""
        history = normalize_history(history)
        if not query or not query.strip():
            yield history, query or ""
            return
        history = history + [{"role": "user", "content": query}]
        yield history, ""
        for updated in self._stream_reply(history, system, adapter, temperature, top_p, max_new_tokens):
            yield updated, ""

    def regenerate(self, history, system: Optional[str] = None, adapter: Optional[str] = BASE,
                   temperature: Optional[float] = None, top_p: Optional[float] = None,
                   max_new_tokens: Optional[int] = None) -> Iterator[list[dict]]:
        """Answer the last question again, replacing the answer it had."""
        history = normalize_history(history)
        last_user = max((i for i, m in enumerate(history) if m["role"] == "user"), default=None)
        if last_user is None:
            yield history
            return
        history = history[:last_user + 1]
        yield history
        yield from self._stream_reply(history, system, adapter, temperature, top_p, max_new_tokens)

    @staticmethod
    def clear() -> tuple[list, str]:
        """Forget the conversation (and empty the text box)."""
        return [], ""

    def close(self) -> None:
        self.engine.stop()


def offline_theme():
    """gradio's default look with the system's fonts: the default theme fetches fonts from Google."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def _as_ui_error(fn):
    """Wrap a streaming handler so bad settings or an overlong chat show as an error toast, not a crash."""
    import gradio as gr

    def wrapped(*args):
        try:
            yield from fn(*args)
        except (ValueError, RuntimeError) as e:  # a prompt over the context, bad settings, a full queue
            raise gr.Error(str(e)) from e

    wrapped.__name__ = fn.__name__
    return wrapped


def build_webui(lm, multi_lora=None, template: Optional[str] = None, config: Optional[GenerationConfig] = None,
                system: Optional[str] = None):
    """The chat page (a `gr.Blocks`) for a loaded model; launch it with `.queue().launch(...)`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    handlers = ChatHandlers(lm, multi_lora, template, config)
    config = handlers.config
    name = Path(str(lm.source)).name.removesuffix(".gguf")
    with gr.Blocks(title=f"danlu chat · {name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## 丹炉 danlu chat\n`{name}`" + (f" · adapters: {', '.join(handlers.adapters[1:])}"
                                                       if len(handlers.adapters) > 1 else ""))
        chatbot = gr.Chatbot(label=name, elem_id="chatbot", height=480, buttons=["copy"],
                             feedback_options=None)
        # lines=1 (growing to 8): gradio sends on Enter only then; Shift+Enter still breaks the line
        query = gr.Textbox(lines=1, max_lines=8, label="Input", elem_id="query",
                           placeholder="Type a message, then Enter or Submit (Shift+Enter: a new line)")
        with gr.Row():
            clear_btn = gr.Button("🧹 Clear History (清除历史)", elem_id="clear")
            submit_btn = gr.Button("🚀 Submit (发送)", variant="primary", elem_id="submit")
            regen_btn = gr.Button("🤔️ Regenerate (重试)", elem_id="regenerate")
        with gr.Accordion("Settings (设置)", open=True):
            with gr.Row():
                system_box = gr.Textbox(value=system or "", label="System prompt (系统提示)", lines=2, scale=3,
                                        placeholder="empty: the model's default", elem_id="system")
                adapter = gr.Dropdown(choices=handlers.adapters, value=BASE, label="Adapter (LoRA)",
                                      interactive=len(handlers.adapters) > 1, scale=1, elem_id="adapter")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=config.temperature, step=0.05, label="temperature",
                                        info="0 = greedy", elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=config.top_p, step=0.05, label="top_p", elem_id="top_p")
                max_new_tokens = gr.Slider(1, max(2048, config.max_new_tokens), value=config.max_new_tokens,
                                           step=1, label="max_new_tokens", elem_id="max_new_tokens")
        settings = [system_box, adapter, temperature, top_p, max_new_tokens]
        submit = _as_ui_error(handlers.submit)
        submit_btn.click(submit, [query, chatbot, *settings], [chatbot, query])
        query.submit(submit, [query, chatbot, *settings], [chatbot, query])
        regen_btn.click(_as_ui_error(handlers.regenerate), [chatbot, *settings], [chatbot])
        clear_btn.click(handlers.clear, [], [chatbot, query], queue=False)
    demo.handlers = handlers  # for tests and callers that want the plain functions
    return demo
