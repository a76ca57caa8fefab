"""Rollout log-probs: what decoding with the KV cache reports equals one full forward pass over prompt+answer."""
import pytest
import torch

from danlu.checkpoints.load import load_pretrained
from danlu.generation.generate import generate
from danlu.generation.sampling import GenerationConfig
from tests.conftest import make_hf_model, save_hf_model


class NumberTokenizer:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33, 34]]

CONFIGS = {
    "greedy": GenerationConfig(max_new_tokens=10, temperature=0),
    "temperature 1": GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, seed=3),
    "filtered, penalised": GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9,
                                            repetition_penalty=1.3, seed=5),
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    """A tiny random checkpoint read by danlu; a wider initialisation than the published one so that the
    next-token distributions are peaked rather than nearly uniform (a wrong position or scale shows)."""
    extra = {"tie_word_embeddings": True} if request.param == "qwen2" else {}
    hf = make_hf_model(request.param, initializer_range=0.2, **extra)
    directory = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    return load_pretrained(directory, dtype="float32", device="cpu").model.eval()


def full_forward_logprobs(model, completions, temperature):
    """Reference: log_softmax(logits / temperature) of each answer token, from one forward pass over the
    right-padded batch of prompt+answer (the decoding loop left-pads, so the layouts differ too)."""
    sequences = [c.prompt_ids + c.token_ids for c in completions]
    width = max(map(len, sequences)) + 2
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    with torch.no_grad():
        logits = model(input_ids, attention_mask=mask).float()
    scale = temperature if temperature not in (0, 1) else 1.0
    log_probs = torch.log_softmax(logits / scale, dim=-1)
    answers = []
    for row, c in enumerate(completions):
        start = len(c.prompt_ids) - 1  # the position that predicts the first answer token
        positions = torch.arange(start, start + len(c.token_ids))
        answers.append(log_probs[row, positions, torch.tensor(c.token_ids, dtype=torch.long)])
    return answers


@pytest.mark.parametrize("keep_eos", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_rollout_logprobs_equal_a_full_forward_pass(tiny, name, keep_eos):
    config = CONFIGS[name]
    free = generate(tiny, NumberTokenizer(), PROMPTS, config, eos_ids=[])
    eos = free[1].token_ids[4]  # some rows end early, so rows leave the batch mid-way
    completions = generate(tiny, NumberTokenizer(), PROMPTS, config, eos_ids=[eos], logprobs=True,
                           keep_eos=keep_eos)
    assert len({len(c.token_ids) for c in completions}) > 1
    ended = [c for c in completions if c.finish_reason == "stop"]
    assert ended and all((c.token_ids[-1] == eos) == keep_eos for c in ended if c.token_ids)
    expected = full_forward_logprobs(tiny, completions, config.temperature)
    for c, reference in zip(completions, expected):
        assert len(c.logprobs) == len(c.token_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_asking_for_logprobs_changes_no_token(tiny, name):
    config = CONFIGS[name]
    plain = generate(tiny, NumberTokenizer(), PROMPTS, config, eos_ids=[2])
    with_logprobs = generate(tiny, NumberTokenizer(), PROMPTS, config, eos_ids=[2], logprobs=True)
    assert [c.token_ids for c in plain] == [c.token_ids for c in with_logprobs]
    assert [c.finish_reason for c in plain] == [c.finish_reason for c in with_logprobs]
    assert all(c.logprobs is None for c in plain)


def test_greedy_tokens_are_the_most_likely(tiny):
    completion = generate(tiny, NumberTokenizer(), [PROMPTS[1]], CONFIGS["greedy"], eos_ids=[], logprobs=True)[0]
    assert all(lp <= 0 for lp in completion.logprobs)
    ids = PROMPTS[1] + completion.token_ids
    with torch.no_grad():
        best = torch.log_softmax(tiny(torch.tensor([ids]))[0].float(), -1).max(-1).values
    torch.testing.assert_close(torch.tensor(completion.logprobs), best[len(PROMPTS[1]) - 1:-1], atol=1e-5, rtol=0)
