"""The losses module: parity with transformers, the chunked loss equal to the plain one, per-sequence log-probs."""
import pytest
import torch
from torch import nn

from danlu.training.losses import causal_lm_loss, chunked_causal_lm_loss, sequence_log_probs


def random_batch(batch=2, seq=7, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :3] = -100
    return logits, labels


def test_causal_lm_loss_equals_transformers_shifted_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels = random_batch()
    ours, count = causal_lm_loss(logits, labels)
    assert count == 2 * 6 - 2
    assert torch.allclose(ours, ForCausalLMLoss(logits, labels, vocab_size=11))


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_loss_and_its_gradients_equal_the_plain_loss(chunk_size):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[1, :5] = -100
    plain, n_plain = causal_lm_loss(head(hidden), labels)
    plain.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    chunked, n_chunked = chunked_causal_lm_loss(hidden, head, labels, chunk_size)
    chunked.backward()
    assert n_chunked == n_plain and torch.allclose(chunked, plain, atol=1e-6)
    torch.testing.assert_close(hidden.grad, grads[0])
    torch.testing.assert_close(head.weight.grad, grads[1])


def test_chunked_loss_never_holds_the_whole_batch_logits():
    head = nn.Linear(8, 1000, bias=False)
    hidden = torch.randn(4, 64, 8, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 64))
    largest = []

    def record(module, inputs, output):
        largest.append(output.numel())

    head.register_forward_hook(record)
    loss, _ = chunked_causal_lm_loss(hidden, head, labels, chunk_size=32)
    loss.backward()  # the backward pass recomputes each chunk: still one chunk at a time
    assert max(largest) == 32 * 1000 and len(largest) == 2 * 8


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        chunked_causal_lm_loss(torch.zeros(1, 2, 4), nn.Linear(4, 5), torch.zeros(1, 2, dtype=torch.long), 0)


def test_sequence_log_probs_sum_the_labelled_next_tokens():
    logits, labels = random_batch()
    summed, counts = sequence_log_probs(logits, labels)
    log_probs = torch.log_softmax(logits, -1)
    for row in range(2):
        expected = sum(log_probs[row, t, labels[row, t + 1]] for t in range(6) if labels[row, t + 1] != -100)
        assert summed[row].item() == pytest.approx(float(expected), abs=1e-5)
    assert counts.tolist() == [4, 6]
