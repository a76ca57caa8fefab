"""One answer being decoded, token by token: its seed, the tokens it has seen (repetition penalty), its stop strings
and end-of-sequence ids, and the text handed out so far. The server keeps one per request, and `decode_steps`
(generate, stream, chat) one per row: sampling a row never depends on the other rows of the batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from danlu.generation.sampling import GenerationConfig, next_tokens
from danlu.generation.text import IncrementalDecoder


@dataclass
class TokenChoice:
    token: int
    logprob: Optional[float] = None  # under the model's distribution (log_softmax of the logits), when asked
    top: list[tuple[int, float]] = field(default_factory=list)  # the `top_logprobs` most likely (token, logprob)


class SequenceState:
    def __init__(self, prompt_ids: Sequence[int], config: GenerationConfig, eos_ids: Sequence[int],
                 tokenizer: Optional[object], vocab_size: int, device="cpu", ignore_eos: bool = False,
                 top_logprobs: Optional[int] = None, max_new_tokens: Optional[int] = None):
        """`tokenizer` None: no text is made (nor stop strings looked for). `max_new_tokens`: a bound below the
        config's (what the context leaves)."""
        self.config, self.eos_ids, self.ignore_eos = config, set(eos_ids), ignore_eos
        self.top_logprobs = top_logprobs
        self.generator = None
        if config.seed is not None and not config.greedy:
            self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.seen = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[list(prompt_ids)] = True
        if tokenizer is None and config.stop:
            raise ValueError("stop strings need a tokenizer to see them in the text")
        self.decoder = IncrementalDecoder(tokenizer, config.stop) if tokenizer is not None else None
        self.max_new_tokens = min(config.max_new_tokens, max_new_tokens or config.max_new_tokens)
        self.generated: list[int] = []
        self.logprobs: list[TokenChoice] = []

    def choose(self, logits: torch.Tensor) -> TokenChoice:
        """The next token from this row's logits [vocab], with its own generator and seen tokens (and its
        log-probability only when asked: a softmax over the vocabulary per token is not free)."""
        token = int(next_tokens(logits[None], self.config, None if self.seen is None else self.seen[None],
                                self.generator)[0])
        if self.top_logprobs is None:
            return TokenChoice(token)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = []
        if self.top_logprobs:
            values, ids = logprobs.topk(self.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        return TokenChoice(token, float(logprobs[token]), top)

    def accept(self, choice: TokenChoice) -> tuple[str, Optional[str]]:
        """Take the chosen token: the text now final, and "stop" / "length" when the answer ends here."""
        token = choice.token
        self.generated.append(token)
        self.logprobs.append(choice)
        if self.seen is not None:
            self.seen[token] = True
        if token in self.eos_ids and not self.ignore_eos:
            return "", "stop"
        piece = self.decoder.add(token) if self.decoder is not None else ""
        if self.decoder is not None and self.decoder.stopped:
            return piece, "stop"
        if len(self.generated) >= self.max_new_tokens:
            return piece, "length"
        return piece, None

    def flush(self) -> str:
        """Text held back as a possible stop string, final once the answer has ended."""
        return self.decoder.flush() if self.decoder is not None else ""
