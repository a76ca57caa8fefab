"""A live `danlu api` on loopback, serving the real model and two LoRA adapters."""
import socket
import threading
import time

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_adapter(model, path, seed: int):
    """A LoRA adapter on q and v with small random weights (as if trained), in PEFT's format."""
    from danlu.checkpoints.adapters import LoRAConfig, PeftAdapter, write_adapter

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")) and isinstance(module, torch.nn.Linear):
            state[f"{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.05
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.05
    return write_adapter(path, PeftAdapter(LoRAConfig(4, 8, 0.0, ["q_proj", "v_proj"]), state))


@pytest.fixture(scope="session")
def adapters(real_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"user-a": random_adapter(real_lm.model, root / "a", 1), "user-b": random_adapter(real_lm.model, root / "b", 2)}


@pytest.fixture(scope="session")
def server(real_gguf, adapters):
    import uvicorn

    from danlu.checkpoints.load import load_pretrained
    from danlu.serving.api import create_app
    from danlu.serving.engine import Engine
    from danlu.serving.multi_lora import MultiLoRA

    lm = load_pretrained(real_gguf, dtype="float32", device="cpu")  # its own copy: adapters change modules
    engine = Engine(lm.model, lm.tokenizer, max_batch=16, max_queue=64,
                    adapters=MultiLoRA.load(lm.model, {k: str(v) for k, v in adapters.items()})).start()
    app = create_app(engine, "smollm2", default_max_tokens=64)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    yield {"base_url": f"http://127.0.0.1:{port}/v1", "root": f"http://127.0.0.1:{port}", "engine": engine}
    uv.should_exit = True
    thread.join(timeout=10)
    engine.stop()
