"""Text in, text out: the calls a notebook user makes (`danlu.generate`, `danlu.chat`)."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

from danlu.generation.generate import Completion, generate as generate_ids, stream
from danlu.generation.sampling import GenerationConfig
from danlu.tokenization.chat import encode_chat, stop_words


def _config(base: Optional[GenerationConfig], template_stops: Sequence[str], **sampling) -> GenerationConfig:
    config = (base or GenerationConfig()).updated(**{k: v for k, v in sampling.items() if v is not None})
    return config.with_stops(template_stops)


def _need_tokenizer(pretrained) -> None:
    if pretrained.tokenizer is None:
        raise ValueError(f"{pretrained.source} has no tokenizer (a bare preset); load a checkpoint to generate text")


def complete(pretrained, prompts: Union[str, Sequence[str]], chat: bool = False, template: Optional[str] = None,
             system: Optional[str] = None, config: Optional[GenerationConfig] = None,
             batch_size: Optional[int] = None, decoding: str = "dynamic",
             **sampling) -> Union[Completion, list[Completion]]:
    """Complete one prompt or a list; with chat=True each prompt is a user turn in the chat template.
    decoding="compiled": the static-shape step under torch.compile (danlu.generation.decoders)."""
    _need_tokenizer(pretrained)
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    tokenizer = pretrained.tokenizer
    if chat:
        ids = [encode_chat(tokenizer, [{"role": "user", "content": t}], template, system) for t in texts]
        config = _config(config, stop_words(tokenizer, template), **sampling)
    else:
        ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        config = _config(config, (), **sampling)
    results = generate_ids(pretrained.model, tokenizer, ids, config, batch_size=batch_size, decoding=decoding)
    return results[0] if single else results


def generate(pretrained, prompts: Union[str, Sequence[str]], **kwargs) -> Union[str, list[str]]:
    """Like `complete`, returning only the text."""
    result = complete(pretrained, prompts, **kwargs)
    return result.text if isinstance(result, Completion) else [r.text for r in result]


def chat(pretrained, messages: Union[str, Sequence[dict]], template: Optional[str] = None,
         system: Optional[str] = None, stream_output: bool = False, config: Optional[GenerationConfig] = None,
         decoding: str = "dynamic", **sampling) -> Union[str, Iterator[str]]:
    """Answer a conversation (a list of {role, content}, or one user message as a string)."""
    _need_tokenizer(pretrained)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    tokenizer = pretrained.tokenizer
    ids = encode_chat(tokenizer, messages, template, system)
    config = _config(config, stop_words(tokenizer, template), **sampling)
    pieces = stream(pretrained.model, tokenizer, ids, config, decoding=decoding)
    return pieces if stream_output else "".join(pieces)
