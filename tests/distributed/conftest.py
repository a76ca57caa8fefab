import pytest

from tests.conftest import byte_tokenizer, make_hf_model, save_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with the byte tokenizer, saved as a Hugging Face checkpoint (float32)."""
    tokenizer = byte_tokenizer()
    model = make_hf_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return save_hf_model(model, tmp_path_factory.mktemp("model"), tokenizer)
