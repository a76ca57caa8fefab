"""Batched generation with a KV cache: prompts of different lengths are left-padded and decoded together.

`decode_steps` is the loop; `generate` collects whole answers, `stream` yields text as it is decoded.
Asked with `logprobs=True`, `decode_steps` and `generate` also give each sampled token's log-probability
(what RLHF rollouts keep).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from danlu.generation.decoders import make_decoder
from danlu.generation.sampling import GenerationConfig
from danlu.generation.sequence import SequenceState
from danlu.generation.text import find_stop


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    logprobs: Optional[list[float]] = None  # one per token_ids entry, when asked for


@dataclass
class Step:
    row: int
    token: int
    finish_reason: Optional[str]  # set on the row's last step
    logprob: Optional[float] = None  # when decode_steps is asked for log-probs
    text: str = ""  # the row's text made final by this token, when decode_steps has a tokenizer


class ContextOverflow(ValueError):
    """A prompt does not fit in the model's context window."""


def decode_steps(model, prompts: Sequence[Sequence[int]], config: GenerationConfig, eos_ids: Sequence[int],
                 pad_id: int = 0, tokenizer=None, logprobs: bool = False, decoding: str = "dynamic",
                 prompt_indices: Optional[Sequence[int]] = None) -> Iterator[list[Step]]:
    """Yield, per decoding step, the token chosen for every row still running.

    Each row is one SequenceState (generation/sequence.py), as each request is in the server: its own seed
    (`config.for_row(index)`, the prompt's index in the whole job, 0, 1, ... unless `prompt_indices` says: the
    same answer whatever batch it is decoded in, as the server's n choices), seen tokens, end of
    sequence, stop strings (with a `tokenizer`, which also gives each Step's final text) and max_new_tokens.
    Finished rows leave the batch so the rest run faster. With `logprobs`, each Step carries its token's
    log-probability (see `sampled_token_logprobs`). `decoding`: "dynamic" (a growing cache), "static" or
    "compiled" (fixed shapes, the step under torch.compile): see danlu.generation.decoders; the tokens are the
    same whichever way.
    """
    if not model.config.causal:
        raise ValueError(f"{model.config.name or 'this model'} is an encoder (causal=False): it has no "
                         f"language-model head and cannot generate text")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ContextOverflow(f"prompt of {longest} tokens does not fit the context of {context} tokens "
                              f"(over by {longest - context + 1})")
    max_new = min(config.max_new_tokens, context - longest)
    indices = range(len(prompts)) if prompt_indices is None else prompt_indices
    states = [SequenceState(p, config.for_row(index), eos_ids, tokenizer, model.config.vocab_size, device,
                            max_new_tokens=max_new) for index, p in zip(indices, prompts)]
    decoder = make_decoder(model, prompts, pad_id, max_new, decoding)
    rows = list(range(len(prompts)))  # original index of each live batch row
    with torch.inference_mode():
        logits = decoder.prefill()
        while True:
            choices = [states[row].choose(row_logits) for row, row_logits in zip(rows, logits)]
            tokens = torch.tensor([choice.token for choice in choices], device=device)
            token_logprobs = [None] * len(rows)
            if logprobs:
                token_logprobs = sampled_token_logprobs(logits, tokens, config.temperature).tolist()
            steps, keep = [], []
            for j, (row, choice) in enumerate(zip(rows, choices)):
                text, reason = states[row].accept(choice)
                if reason is not None:
                    text += states[row].flush()  # what was held back as a possible stop string is final now
                steps.append(Step(row, choice.token, reason, token_logprobs[j], text))
                if reason is None:
                    keep.append(j)
            yield steps
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                decoder.keep(index)
                tokens = tokens[index]
                rows = [rows[j] for j in keep]
            logits = decoder.step(tokens)


def sampled_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature)[token] per row (or per position: logits [..., vocab], tokens [...]): the
    model's own distribution at the sampling temperature, before repetition penalty and top-k/top-p trim it.

    This is the distribution the token was drawn from, which PPO's probability ratio needs (TRL's PPOTrainer
    since 0.11 divides by the temperature the same way; the 0.9 one that LLaMA-Factory drives recomputes
    log-probs without it). Greedy decoding (temperature 0) and temperature 1 both give the plain log-softmax.
    """
    logits = logits.float()
    if temperature not in (0, 1):
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], config: GenerationConfig,
             eos_ids: Optional[Sequence[int]] = None, batch_size: Optional[int] = None,
             logprobs: bool = False, keep_eos: bool = False, decoding: str = "dynamic",
             prompt_indices: Optional[Sequence[int]] = None) -> list[Completion]:
    """Complete token-id prompts; answers stop at EOS, at a stop string (cut off), or at max_new_tokens.

    With `logprobs`, each Completion also holds the log-probability of each of its token_ids. With `keep_eos`
    the EOS token that ended an answer stays in its token_ids (an RLHF policy learns when to stop). A seeded
    answer is the same whatever `batch_size`: the i-th prompt samples with seed + i, as the API's i-th choice
    (`prompt_indices`: each prompt's index in a larger job, e.g. the lines of a file being resumed).
    `decoding`: as for decode_steps ("compiled" for the torch.compile'd step).
    """
    eos_ids = model.config.eos_token_ids if eos_ids is None else list(eos_ids)
    batch_size = batch_size or len(prompts)
    indices = list(range(len(prompts)) if prompt_indices is None else prompt_indices)
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} prompt_indices for {len(prompts)} prompts")
    results: list[Completion] = []
    for start in range(0, len(prompts), batch_size):
        results.extend(_generate_batch(model, tokenizer, prompts[start:start + batch_size], config, eos_ids,
                                       logprobs, keep_eos, decoding, indices[start:start + batch_size]))
    return results


def _generate_batch(model, tokenizer, prompts, config, eos_ids, logprobs: bool, keep_eos: bool,
                    decoding: str, prompt_indices: Sequence[int]) -> list[Completion]:
    tokens: list[list[int]] = [[] for _ in prompts]
    token_logprobs: list[list[float]] = [[] for _ in prompts]
    reasons: list[str] = ["length"] * len(prompts)
    pad_id = pad_token_id(tokenizer, model.config)
    # the tokenizer is only needed to see stop strings as they are decoded; the answers' text is made once below
    watcher = tokenizer if config.stop else None
    for steps in decode_steps(model, prompts, config, eos_ids, pad_id, watcher, logprobs, decoding, prompt_indices):
        for s in steps:
            if keep_eos or s.token not in eos_ids:
                tokens[s.row].append(s.token)
                token_logprobs[s.row].append(s.logprob)
            if s.finish_reason:
                reasons[s.row] = s.finish_reason
    completions = []
    for prompt, ids, reason, row_logprobs in zip(prompts, tokens, reasons, token_logprobs):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = find_stop(text, config.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        completions.append(Completion(list(prompt), ids, text, reason, row_logprobs if logprobs else None))
    return completions


def stream(model, tokenizer, prompt: Sequence[int], config: GenerationConfig,
           eos_ids: Optional[Sequence[int]] = None, finish: Optional[dict] = None,
           decoding: str = "dynamic") -> Iterator[str]:
    """Yield the answer's text piece by piece: never half a character, never part of a stop string.

    When `finish` is given, its "reason" and "tokens" keys are filled in when the stream ends.
    """
    eos_ids = model.config.eos_token_ids if eos_ids is None else list(eos_ids)
    reason, count = "length", 0
    for steps in decode_steps(model, [prompt], config, eos_ids, pad_token_id(tokenizer, model.config), tokenizer,
                              decoding=decoding):
        step = steps[0]
        count += 1
        if step.text:
            yield step.text
        reason = step.finish_reason or reason
    if finish is not None:
        finish.update(reason=reason, tokens=count)


def pad_token_id(tokenizer, config) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), config.pad_token_id, *config.eos_token_ids):
        if isinstance(candidate, int):
            return candidate
    return 0
