"""On-policy distillation (`--kd_lmbda`): the student answers the prompts itself and the teacher scores its tokens.

GKD (Agarwal et al., 2024; TRL's GKDTrainer `lmbda`): a student trained only on fixed answers is judged at test
time on its own, which drift from them; on its own samples the teacher's per-token distribution says how to
correct them. With probability `fraction` a micro-batch's last answers are replaced by the student's
completions of the same prompts (sampled with the generating arguments), the answer tokens labelled as usual;
the KD terms then compare student and teacher on them. The hard-label loss is left out of such batches (TRL
drops it too): the student's own tokens are no reference. The choice is a function of the seed and the batch's
first prompt, so a resumed run makes the same choices.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import torch

from danlu.data.preference import prompt_of
from danlu.data.supervised import IGNORE_INDEX, Tokenized
from danlu.generation.generate import generate
from danlu.generation.sampling import GenerationConfig

STUDENT_ANSWERS = "student_answers"  # the collated batch's flag: its answers are the student's own


@dataclass
class StudentAnswer(Tokenized):
    """A prompt with the student's own completion as its labelled answer."""


class OnPolicyAnswers:
    """Stage.updates for on-policy KD: each accumulation group, its micro-batches with some answers regenerated."""

    def __init__(self, tokenizer, generation: GenerationConfig, fraction: float, seed: int):
        self.tokenizer, self.generation, self.fraction, self.seed = tokenizer, generation, fraction, seed

    def __call__(self, model, group: list[list[Tokenized]]) -> Iterator[list[list[Tokenized]]]:
        yield [self.student_answers(model, batch) if self.on_policy(batch) else batch for batch in group]

    def on_policy(self, batch: list[Tokenized]) -> bool:
        return random.Random(hash((self.seed, tuple(batch[0].input_ids)))).random() < self.fraction

    @torch.no_grad()
    def student_answers(self, model, batch: list[Tokenized]) -> list[Tokenized]:
        prompts = [prompt_of(example).input_ids for example in batch]
        was_training = model.training
        model.eval()
        try:
            completions = generate(model, self.tokenizer, prompts, self.generation, keep_eos=True)
        finally:
            model.train(was_training)
        return [StudentAnswer(prompt + completion.token_ids, [IGNORE_INDEX] * len(prompt) + completion.token_ids)
                for prompt, completion in zip(prompts, completions)]


def collate_marking_student_answers(examples: list[Tokenized], collate) -> dict:
    """The stage's collate, with the batch flagged when its answers are the student's."""
    batch = collate(examples)
    batch[STUDENT_ANSWERS] = any(isinstance(example, StudentAnswer) for example in examples)
    return batch
