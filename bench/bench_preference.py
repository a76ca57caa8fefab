"""Preference training speed and memory: danlu beside TRL (DPO), and danlu's PPO step (no peer), in one run.

    python bench/bench_preference.py [--quick] [--json OUT] [--modes dpo,ppo,kernels] [--rounds N] [--steps N]

Run it with a Python that has both danlu and trl (e.g. /work/venv-trl/bin/python). The design is
bench/bench_training.py's: the same model for every engine, SmolLM2-135M-Instruct in float32 on the CPU, read
from the Hugging Face directory danlu keeps for the bundled GGUF in `$DANLU_HOME/gguf-cache/`; one fresh
subprocess per engine + mode (peak RSS = ru_maxrss of that process: imports, load and training); warm-up steps,
then the median of the timed steps; engines interleaved (ABBA over --rounds), the timed steps of all rounds
pooled (a round that other processes disturbed even after its reruns is left out when another round was not).
LoRA r=8, alpha=16, dropout 0 on every linear but lm_head (q, k, v, o, gate, up, down); AdamW(lr=1e-5,
weight_decay=0), clip_grad_norm_(1.0), no accumulation, no gradient checkpointing, no autocast.

dpo - one optimizer step on one fixed batch of 2 pairs: prompt 64 + answer 192 random token ids (seed 0), the
answers labelled and the prompts masked; DPO sigmoid loss, beta 0.1; the reference is the policy with its LoRA
adapters off (one base model in memory). tokens/s = the 4 x 256 tokens of the chosen + rejected rows (the policy
forward) per second of the whole optimizer step.
  * danlu: `load_pretrained(dir, dtype="float32")` + `apply_lora`, then per step `collate_pairs` of the
    `TokenizedPair`s, `preference_step(model, batch, Reference(), kind="sigmoid", beta=0.1)` (one forward over
    chosen + rejected, `sequence_log_probs`, the reference forward under no_grad with the adapters disabled,
    `dpo_loss`, its metrics), `loss.backward()`, `clip_grad_norm_`, `AdamW.step()`, `zero_grad(set_to_none)`.
  * trl: a real `trl.DPOTrainer(model, args=DPOConfig(...), train_dataset, processing_class, peft_config=
    LoraConfig(...))` driven by `trainer.train()` for warm-up + timed steps (`max_steps`): TRL wraps the
    `AutoModelForCausalLM` with peft itself, collates with its `DataCollatorForPreference`, and each step runs
    `Trainer.training_step` -> `DPOTrainer.compute_loss` -> `_compute_loss` (TRL 1.13 has no
    `concatenated_forward`/`dpo_loss` methods any more: `_compute_loss` is one policy forward over the
    concatenated chosen + rejected rows, `selective_log_softmax`, the reference forward under `use_adapter`
    (adapter disabled), the sigmoid loss, and TRL's metrics: entropy, logits means, token accuracy, rewards),
    then the Trainer's backward, clip, `torch.optim.AdamW` (`optim="adamw_torch"`), constant scheduler and
    zero_grad. The only override is `_prepare_dataset` returning the dataset unchanged: it already holds
    `prompt_ids`/`chosen_ids`/`rejected_ids` (the same ids as danlu's), so TRL's text tokenization is skipped;
    `compute_loss` and `training_step` are wrapped only to read the clock. TRL's defaults that differ from the
    setup are overridden: `gradient_checkpointing=False` (TRL: True), `bf16=False` (TRL: True), `use_cpu=True`,
    sequential sampler (the same batch every step), no logging or saving.
  Phases (both engines): data (danlu: collate_pairs; trl: the Trainer loop between steps, batch fetch and
  collation included), policy forward and ref forward (forward hooks on the causal LM module, told apart by
  grad mode), loss + metrics (the rest of the loss function), backward, clip, optimizer, zero_grad (trl: + the
  scheduler).

ppo - danlu alone: TRL 1.13 has no PPOTrainer (neither in `trl` nor in `trl.experimental`; the script
checks). One PPO step is the `ppo` recipe's `Stage.updates` on one group of 4 prompts of 64 random ids
(seed 0), as danlu/training/loop.py drives it: `Rollout.experience` (KV-cache generation of 64 new tokens
per prompt, sampling with temperature 1, top_k 0, top_p 1, EOS disabled so every answer has 64 tokens; the
reward `ModelReward` on a deep copy of the base model with a value head from `attach_value_head`; the
values forward; the reference forward with the adapters off; KL-shaped rewards and GAE), then ppo_epochs=4
optimizer steps on batches of 4 (`collate_experience`, `ppo_step`, backward, clip, AdamW, zero_grad). The
policy's critic is `ppo_stage`'s value head (trained with the LoRA weights). Reported: the rollout and the
updates apart; generation tokens/s = 4 x 64 new tokens / generation seconds, update tokens/s =
4 updates x 4 rows x 128 tokens / update seconds.

kernels - danlu alone, informative, median ms on random tensors of the real shapes: the sampling of one decode
step on [4, vocab] logits (next_tokens, its top-k/top-p filters, torch.multinomial vs an inverse-CDF draw), the
answer log-probs of DPO's [4, 256, vocab] logits (danlu's full log_softmax vs gather - logsumexp, with and
without backward), and the lm_head over all positions vs only those that predict an answer token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from bench_training import ALL_LINEAR, ALPHA, RANK, current_rss_bytes, model_directory, peak_rss_bytes
from machine import ForeignLoad, least_disturbed, machine_info, print_aligned, print_foreign_load, save_results

LR = 1e-5
BETA = 0.1
PAIRS, PROMPT, ANSWER = 2, 64, 192
DPO_TOKENS = 2 * PAIRS * (PROMPT + ANSWER)  # chosen + rejected rows through the policy forward
PPO_PROMPTS, PPO_PROMPT, PPO_NEW, PPO_EPOCHS, PPO_BATCH = 4, 64, 64, 4, 4
GENERATED = PPO_PROMPTS * PPO_NEW
UPDATE_TOKENS = PPO_EPOCHS * PPO_PROMPTS * (PPO_PROMPT + PPO_NEW)
ENGINES = {"dpo": ("trl", "danlu"), "ppo": ("danlu",), "kernels": ("danlu",)}
MIB = 1024 ** 2


# ---------------------------------------------------------------- the same token ids for every engine

def fixed_pairs(vocab_size: int) -> list[tuple[list[int], list[int], list[int]]]:
    """PAIRS x (prompt, chosen answer, rejected answer) of random ids, seed 0."""
    import torch

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab_size, (PAIRS, PROMPT), generator=generator).tolist()
    chosen = torch.randint(0, vocab_size, (PAIRS, ANSWER), generator=generator).tolist()
    rejected = torch.randint(0, vocab_size, (PAIRS, ANSWER), generator=generator).tolist()
    return list(zip(prompts, chosen, rejected))


def fixed_prompts(vocab_size: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (PPO_PROMPTS, PPO_PROMPT), generator=generator).tolist()


# ---------------------------------------------------------------- where the time goes

class PhaseClock:
    """Seconds per named phase, summed until `take()`: timed sections, timed calls and forward hooks."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, fn, name: str):
        def timed_fn(*args, **kwargs):
            with self.timed(name):
                return fn(*args, **kwargs)
        return timed_fn

    def time_forwards(self, module, name_of) -> None:
        """Time every call of `module` under the phase `name_of(kwargs)` (decided when the call starts)."""
        started = []

        def before(_module, _args, kwargs):
            started.append((time.perf_counter(), name_of(kwargs)))

        def after(_module, _args, _kwargs, _out):
            start, name = started.pop()
            self.seconds[name] += time.perf_counter() - start

        module.register_forward_pre_hook(before, with_kwargs=True)
        module.register_forward_hook(after, with_kwargs=True)

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def grad_mode_forward(_kwargs) -> str:
    import torch

    return "policy forward" if torch.is_grad_enabled() else "ref forward"


def measure(step, clock: PhaseClock, warmup: int, steps: int, phases=lambda p: p) -> dict:
    """Run `step()` (returns the loss) warm-up + timed times; per timed step its phases and the foreign load."""
    losses = [step() for _ in range(warmup)]
    clock.take()
    peak_after_warmup = peak_rss_bytes()
    samples, foreign = [], []
    for _ in range(steps):
        with ForeignLoad() as load:
            start = time.perf_counter()
            losses.append(step())
            total = time.perf_counter() - start
        samples.append({**phases(clock.take()), "step": total})
        foreign.append(round(load.share, 3))
    return {"losses": losses, "samples": samples, "foreign_cpu_per_step": foreign,
            "peak_rss_after_warmup": peak_after_warmup}


def loss_and_metrics(phases: dict) -> dict:
    """DPO: the loss function's time without its two forwards (log-probs, loss, metrics)."""
    phases["loss + metrics"] = phases.pop("loss function") - phases["policy forward"] - phases["ref forward"]
    return phases


def optimizer_phases(clock: PhaseClock, params, optimizer) -> None:
    import torch

    with clock.timed("clip"):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    with clock.timed("optimizer"):
        optimizer.step()
    with clock.timed("zero_grad"):
        optimizer.zero_grad(set_to_none=True)


def trainable(model) -> list:
    return [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]


# ---------------------------------------------------------------- workers: one engine, one mode, one process

def load_danlu(model_dir: str):
    """The danlu model and its tokenizer, LoRA not yet applied (PPO copies the base first)."""
    from danlu.checkpoints.load import load_pretrained

    lm = load_pretrained(model_dir, dtype="float32", device="cpu")
    return lm.model, lm.tokenizer


def add_lora(model) -> None:
    import torch

    from danlu.tuning.lora import LoRAConfig, apply_lora

    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, targets=list(ALL_LINEAR)))


def dpo_danlu(model_dir: str, warmup: int, steps: int) -> dict:
    import torch

    from danlu.data.collate import collate_pairs
    from danlu.data.preference import TokenizedPair
    from danlu.data.supervised import IGNORE_INDEX, Tokenized
    from danlu.training.recipes.dpo import preference_step
    from danlu.training.recipes.pt import pad_id
    from danlu.training.reference import Reference

    model, tokenizer = load_danlu(model_dir)
    add_lora(model)
    model.train()
    pairs = [TokenizedPair(Tokenized(p + c, [IGNORE_INDEX] * len(p) + c), Tokenized(p + r, [IGNORE_INDEX] * len(p) + r))
             for p, c, r in fixed_pairs(model.config.vocab_size)]
    reference, pad = Reference(), pad_id(tokenizer)
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    clock = PhaseClock()
    clock.time_forwards(model, grad_mode_forward)

    def step() -> float:
        with clock.timed("data"):
            batch = collate_pairs(pairs, pad_id=pad)
        with clock.timed("loss function"):
            out = preference_step(model, batch, reference, kind="sigmoid", beta=BETA)
        with clock.timed("backward"):
            out.loss.backward()
        optimizer_phases(clock, params, optimizer)
        return out.loss.item()

    return {"params": params, "run": lambda: measure(step, clock, warmup, steps, loss_and_metrics)}


def dpo_trl(model_dir: str, warmup: int, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    hf_logging.set_verbosity_error()
    clock = PhaseClock()

    class BenchDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

        def compute_loss(self, *args, **kwargs):
            with clock.timed("loss function"):
                return super().compute_loss(*args, **kwargs)

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            timer.mark("training_step")
            timer.losses.append(loss.item())
            return loss

    timer = TrainerSteps(clock, warmup, TrainerCallback)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = fixed_pairs(model.config.vocab_size)
    dataset = Dataset.from_dict({"prompt_ids": [p for p, _, _ in pairs], "chosen_ids": [c for _, c, _ in pairs],
                                 "rejected_ids": [r for _, _, r in pairs]})
    output_dir = tempfile.TemporaryDirectory(prefix="bench-dpo-")  # nothing is saved; removed at exit
    args = DPOConfig(output_dir=output_dir.name, max_steps=warmup + steps,
                     per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
                     max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], gradient_checkpointing=False,
                     bf16=False, fp16=False, use_cpu=True, train_sampling_strategy="sequential",
                     logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
                     disable_tqdm=True, dataloader_num_workers=0, seed=0)
    torch.manual_seed(0)
    trainer = BenchDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                     target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM"),
                              callbacks=[timer.callback])
    clock.time_forwards(trainer.model.get_base_model(), grad_mode_forward)

    def run() -> dict:
        trainer.train()
        return timer.result()

    return {"params": trainable(trainer.model), "run": run, "output_dir": output_dir}


class TrainerSteps:
    """Per optimizer step of a transformers Trainer, the same phases as danlu's loop, from its callbacks."""

    def __init__(self, clock: PhaseClock, warmup: int, callback_base):
        self.clock, self.warmup = clock, warmup
        self.marks: dict[str, float] = {}
        self.losses: list[float] = []
        self.samples: list[dict] = []
        self.foreign: list[float] = []
        self.peak_after_warmup = 0
        self.load = None
        self.callback = self._callback(callback_base)

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def _callback(self, base):
        steps = self

        class Callback(base):
            def on_train_begin(self, args, state, control, **kwargs):
                steps.start_interval()

            def on_step_begin(self, args, state, control, **kwargs):
                steps.mark("begin")

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                steps.mark("clipped")

            def on_optimizer_step(self, args, state, control, **kwargs):
                steps.mark("optimizer")

            def on_step_end(self, args, state, control, **kwargs):
                steps.end_step(state.global_step)

        return Callback()

    def start_interval(self) -> None:
        self.mark("end")
        self.load = ForeignLoad().__enter__()

    def end_step(self, global_step: int) -> None:
        now, m = time.perf_counter(), self.marks
        self.load.__exit__(None, None, None)
        phases = self.clock.take()
        phases["data"] = m["begin"] - m["end"]
        phases["backward"] = m["training_step"] - m["begin"] - phases["loss function"]
        loss_and_metrics(phases)
        phases["clip"] = m["clipped"] - m["training_step"]
        phases["optimizer"] = m["optimizer"] - m["clipped"]
        phases["zero_grad"] = now - m["optimizer"]
        phases["step"] = now - m["end"]
        if global_step > self.warmup:
            self.samples.append(phases)
            self.foreign.append(round(self.load.share, 3))
        elif global_step == self.warmup:
            self.peak_after_warmup = peak_rss_bytes()
        self.start_interval()

    def result(self) -> dict:
        return {"losses": self.losses, "samples": self.samples, "foreign_cpu_per_step": self.foreign,
                "peak_rss_after_warmup": self.peak_after_warmup}


def ppo_danlu(model_dir: str, warmup: int, steps: int) -> dict:
    import copy

    import torch

    import danlu.training.recipes.ppo as ppo
    from danlu.data.supervised import Tokenized
    from danlu.generation.sampling import GenerationConfig
    from danlu.models.value_head import attach_value_head
    from danlu.training.recipes.pt import pad_id
    from danlu.training.reference import Reference
    from danlu.training.rewards import ModelReward

    model, tokenizer = load_danlu(model_dir)
    model.config.eos_token_id = None  # EOS disabled: every answer is PPO_NEW tokens long
    torch.manual_seed(0)
    reward_model = copy.deepcopy(model)  # as build_reward: a copy of the starting base, with its value head
    attach_value_head(reward_model, bias=False)
    reward = ModelReward(reward_model, pad_id(tokenizer))
    settings = ppo.PPOSettings(GenerationConfig(max_new_tokens=PPO_NEW, temperature=1.0, top_k=0, top_p=1.0),
                               batch_size=PPO_BATCH, accumulation=1, ppo_epochs=PPO_EPOCHS)
    prompts = [Tokenized(ids, []) for ids in fixed_prompts(model.config.vocab_size)]
    stage = ppo.ppo_stage(model, tokenizer, prompts, reward, Reference(), settings)
    add_lora(model)  # as train.py: apply_finetuning after build_stage, the value head trains too
    for name in stage.trained_modules:
        model.get_submodule(name).requires_grad_(True)
    model.train()
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    clock = PhaseClock()
    clock.time_forwards(model, policy_call)
    clock.time_forwards(reward_model, lambda _kwargs: "reward forward")
    ppo.generate = clock.wrap(ppo.generate, "generation")
    group = [list(stage.train)]  # one micro-batch of PPO_PROMPTS prompts: one PPO step

    def step() -> float:
        losses, start = [], time.perf_counter()
        for i, micro_batches in enumerate(stage.updates(model, group)):
            if i == 0:
                clock.seconds["rollout"] += time.perf_counter() - start
            with clock.timed("updates"):
                with clock.timed("collate"):
                    batch = stage.collate(micro_batches[0])
                with clock.timed("ppo_step"):
                    out = stage.step(model, batch)
                with clock.timed("backward"):
                    out.loss.backward()
                optimizer_phases(clock, params, optimizer)
            losses.append(out.loss.item())
        return statistics.fmean(losses)

    return {"params": params, "run": lambda: measure(step, clock, warmup, steps)}


def policy_call(kwargs) -> str:
    """Which of PPO's forwards a call of the policy model is."""
    import torch

    if kwargs.get("kv_cache") is not None:
        return "generation forwards"
    if torch.is_grad_enabled():
        return "policy forward"
    return "values forward" if kwargs.get("return_hidden") else "ref forward"


def kernels(model_dir: str, warmup: int, steps: int) -> dict:
    """Milliseconds of the pieces of danlu's preference recipes that touch the whole vocabulary."""
    import torch

    from danlu.generation.generate import sampled_token_logprobs
    from danlu.generation.sampling import GenerationConfig, filter_top_k, filter_top_p, next_tokens
    from danlu.training.losses import next_token_labels, sequence_log_probs

    config = json.loads((Path(model_dir) / "config.json").read_text())
    vocab, hidden_size = config["vocab_size"], config["hidden_size"]
    generator = torch.Generator().manual_seed(0)
    reps = max(3, steps * 4)
    step_logits = torch.randn(PPO_PROMPTS, vocab, generator=generator) * 3
    tokens = torch.randint(0, vocab, (PPO_PROMPTS,), generator=generator)
    step_probs = step_logits.softmax(-1)
    ours = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0)
    dense_top_p = GenerationConfig(temperature=1.0, top_k=0, top_p=0.9)
    defaults = GenerationConfig()
    dpo_logits = torch.randn(2 * PAIRS, PROMPT + ANSWER, vocab, generator=generator)
    labels = torch.randint(0, vocab, (2 * PAIRS, PROMPT + ANSWER), generator=generator)
    labels[:, :PROMPT] = -100
    hidden = torch.randn(2 * PAIRS, PROMPT + ANSWER, hidden_size, generator=generator)
    head = torch.randn(vocab, hidden_size, generator=generator) * 0.02
    labelled = hidden[:, PROMPT - 1:-1]  # the positions that predict an answer token

    def selective(logits, labels):
        targets = next_token_labels(labels)
        mask = targets != -100
        picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return ((picked - torch.logsumexp(logits, dim=-1)) * mask).sum(-1), mask.sum(-1)

    def forward_backward(fn):
        def run():
            logits = dpo_logits.clone().requires_grad_(True)
            fn(logits, labels)[0].sum().backward()
        return run

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn(dpo_logits, labels)
        return run

    sampling = "one decode step's sampling on [4, vocab] logits: "
    cases = {
        sampling + "next_tokens, T=1, top_k=0, top_p=1 (this benchmark's rollout)":
            lambda: next_tokens(step_logits, ours, None, None),
        sampling + "next_tokens, T=1, top_k=0, top_p=0.9": lambda: next_tokens(step_logits, dense_top_p, None, None),
        sampling + "next_tokens, T=0.7, top_k=50, top_p=0.9 (GenerationConfig's defaults)":
            lambda: next_tokens(step_logits, defaults, None, None),
        sampling + "filter_top_p(0.9) alone on dense logits (sorts the vocabulary)":
            lambda: filter_top_p(step_logits, 0.9),
        sampling + "filter_top_k(50) alone": lambda: filter_top_k(step_logits, 50),
        sampling + "torch.multinomial alone (draws one exponential per vocabulary entry)":
            lambda: torch.multinomial(step_probs, 1),
        sampling + "an inverse-CDF draw instead (cumsum + searchsorted, one uniform per row)":
            lambda: inverse_cdf_sample(step_probs),
        sampling + "sampled_token_logprobs (the rollout's log-probs)":
            lambda: sampled_token_logprobs(step_logits, tokens, 1.0),
        "DPO answer log-probs [4, 256, vocab], forward + backward: sequence_log_probs (full log_softmax)":
            forward_backward(sequence_log_probs),
        "DPO answer log-probs [4, 256, vocab], forward + backward: gather - logsumexp (selective)":
            forward_backward(selective),
        "DPO answer log-probs [4, 256, vocab], no_grad (reference): sequence_log_probs": no_grad(sequence_log_probs),
        "DPO answer log-probs [4, 256, vocab], no_grad (reference): gather - logsumexp": no_grad(selective),
        "lm_head forward over all 4 x 256 positions": lambda: torch.nn.functional.linear(hidden, head),
        "lm_head forward over the 4 x 192 answer-predicting positions only":
            lambda: torch.nn.functional.linear(labelled, head),
    }
    full, picked = sequence_log_probs(dpo_logits, labels)[0], selective(dpo_logits, labels)[0]
    timings = {name: median_ms(fn, reps) for name, fn in cases.items()}
    return {"kernels_ms": timings, "kernel_reps": reps, "vocab_size": vocab,
            "selective_matches": bool(torch.allclose(full, picked, rtol=1e-4, atol=1e-2)),
            "logits_mib": dpo_logits.numel() * 4 / MIB}


def inverse_cdf_sample(probs):
    """One token per row from the same distribution as torch.multinomial(probs, 1), with one random number."""
    import torch

    cumulative = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, u).clamp(max=probs.shape[-1] - 1).squeeze(-1)


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


WORKERS = {("dpo", "danlu"): dpo_danlu, ("dpo", "trl"): dpo_trl, ("ppo", "danlu"): ppo_danlu}


def worker(engine: str, mode: str, model_dir: str, warmup: int, steps: int) -> dict:
    import torch

    if mode == "kernels":
        return {"engine": engine, "mode": mode, "threads": torch.get_num_threads(),
                **kernels(model_dir, warmup, steps)}
    t0 = time.perf_counter()
    built = WORKERS[(mode, engine)](model_dir, warmup, steps)
    load_seconds = time.perf_counter() - t0
    rss_after_load, peak_after_load = current_rss_bytes(), peak_rss_bytes()
    measured = built["run"]()
    return {"engine": engine, "mode": mode, "threads": torch.get_num_threads(), "warmup_steps": warmup,
            "timed_steps": steps, "trainable_params": sum(p.numel() for p in built["params"]),
            "load_seconds": load_seconds, "rss_after_load": rss_after_load, "peak_rss_after_load": peak_after_load,
            "peak_rss": peak_rss_bytes(), **measured}


# ---------------------------------------------------------------- driver: machine, interleaved runs, tables

def run_worker(engine: str, mode: str, model_dir: Path, warmup: int, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--mode", mode,
           "--model-dir", str(model_dir), "--warmup", str(warmup), "--steps", str(steps)]
    with ForeignLoad() as load:
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} {mode} worker failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(process_seconds=wall, foreign_cpu=round(load.share, 3))
    return result


def run_measured(engine: str, mode: str, model_dir: Path, warmup: int, steps: int, args) -> dict:
    """bench_training's policy: wait for a quiet machine, rerun a disturbed run, keep the least disturbed."""
    def disturbance(result: dict) -> float:
        return max(result["foreign_cpu"], statistics.median(result.get("foreign_cpu_per_step") or [0.0]))

    return least_disturbed(lambda: run_worker(engine, mode, model_dir, warmup, steps), args.retries,
                           args.busy_threshold, args.max_wait, disturbance, wait_first=True)


def pooled(runs: list[dict], threshold: float) -> dict:
    """The rounds of one engine + mode as one: medians over every timed step, the highest peak RSS. A round
    that other processes disturbed (even after its reruns) is left out if another round was not."""
    clean = [r for r in runs if r["disturbed"] <= threshold] or runs
    samples = [s for r in clean for s in r["samples"]]
    return {"seconds_per_step": statistics.median(s["step"] for s in samples),
            "phases": {k: statistics.median(s.get(k, 0.0) for s in samples) for k in samples[0]},
            "peak_rss": max(r["peak_rss"] for r in runs), "timed_steps": len(samples), "rounds_used": len(clean),
            "foreign_cpu": max(r["disturbed"] for r in clean)}


def trl_has_ppo() -> dict:
    import importlib.util
    import warnings

    import trl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # importing trl.experimental warns that its APIs are unstable
        experimental = [m for m in ("trl.experimental.ppo", "trl.experimental.ppo_trainer")
                        if importlib.util.find_spec(m) is not None]
    return {"trl": trl.__version__, "trl.PPOTrainer": hasattr(trl, "PPOTrainer"), "trl.experimental ppo": experimental}


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("danlu", "trl", "peft", "datasets", "accelerate"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:,.0f}"


def table_rows(summary: dict) -> list[tuple]:
    rows = []
    dpo = summary.get("dpo", {})
    if "danlu" in dpo and "trl" in dpo:
        trl, dl = dpo["trl"], dpo["danlu"]
        for engine, r in (("trl (DPOTrainer)", trl), ("danlu", dl)):
            ratio = engine == "danlu"
            rows.append((engine, "DPO sigmoid, 2 pairs x 256", f"{r['seconds_per_step']:.2f}",
                         f"{DPO_TOKENS / r['seconds_per_step']:.1f}", mib(r["peak_rss"]),
                         f"{trl['seconds_per_step'] / dl['seconds_per_step']:.2f}x" if ratio else "1.00x",
                         f"{dl['peak_rss'] / trl['peak_rss']:.2f}x" if ratio else "1.00x"))
    if "danlu" in summary.get("ppo", {}):
        r = summary["ppo"]["danlu"]
        p = r["phases"]
        for label, seconds, tokens in (("PPO step (rollout + 4 updates)", r["seconds_per_step"], None),
                                       ("  rollout (generation 4 x 64 + reward/values/ref)", p["rollout"], None),
                                       ("  generation alone (tok/s = new tokens)", p["generation"], GENERATED),
                                       ("  updates, 4 x batch 4 x 128 (tok/s = rows' tokens)", p["updates"],
                                        UPDATE_TOKENS)):
            rows.append(("danlu", label, f"{seconds:.2f}", f"{tokens / seconds:.1f}" if tokens else "",
                         mib(r["peak_rss"]), "no peer", "no peer"))
    return rows


def print_table(summary: dict) -> None:
    print_aligned(("engine", "mode", "s/step", "tokens/s", "peak RSS MiB", "tok/s ratio (danlu/TRL)",
                   "RSS ratio (danlu/TRL)"), table_rows(summary))


def print_phases(summary: dict) -> None:
    dpo = summary.get("dpo", {})
    if dpo:
        engines = [e for e in ("trl", "danlu") if e in dpo]
        names = list(dict.fromkeys(k for e in engines for k in dpo[e]["phases"]))
        print("\nDPO, median seconds per phase:")
        print_aligned(("phase", *engines), [(n, *(f"{dpo[e]['phases'].get(n, 0.0):.3f}" for e in engines))
                                            for n in names])
    if "danlu" in summary.get("ppo", {}):
        p = summary["ppo"]["danlu"]["phases"]
        order = ["rollout", "generation", "generation forwards", "reward forward", "values forward", "ref forward",
                 "updates", "collate", "ppo_step", "policy forward", "backward", "clip", "optimizer", "zero_grad",
                 "step"]
        print("\nPPO (danlu), median seconds per PPO step (updates: the 4 optimizer steps together):")
        print_aligned(("phase", "danlu"), [(n, f"{p[n]:.3f}") for n in order if n in p])


def print_runs(results: dict) -> None:
    print("\nper run:")
    for mode, runs in results["runs"].items():
        for engine, rounds in runs.items():
            for r in rounds:
                if mode == "kernels":
                    continue
                losses = r["losses"]
                print(f"  {mode:4} {engine:5} median {statistics.median(s['step'] for s in r['samples']):.2f} s/step "
                      f"| trainable {r['trainable_params']:,} | load {r['load_seconds']:.1f} s | RSS after load "
                      f"{mib(r['rss_after_load'])} MiB, peak after load {mib(r['peak_rss_after_load'])}, after "
                      f"warm-up {mib(r['peak_rss_after_warmup'])}, end {mib(r['peak_rss'])} | loss "
                      f"{losses[0]:.4f} -> {losses[-1]:.4f} | other processes {r['foreign_cpu']:.0%} of the CPU "
                      f"(per timed step {', '.join(f'{x:.0%}' for x in r['foreign_cpu_per_step'])}), "
                      f"attempt {r['attempt']}")


def print_kernels(results: dict) -> None:
    for r in results["runs"].get("kernels", {}).get("danlu", []):
        print(f"\nkernels (danlu, median of {r['kernel_reps']} calls, vocabulary {r['vocab_size']:,}; DPO logits "
              f"{r['logits_mib']:.0f} MiB in float32; selective == full log_softmax: {r['selective_matches']}):")
        print_aligned(("kernel", "ms"), [(k, f"{v:.2f}") for k, v in r["kernels_ms"].items()])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps, 1 round: a smoke test")
    p.add_argument("--json", metavar="OUT", help="also save every figure as JSON")
    p.add_argument("--modes", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--rounds", type=int, help="interleaved (ABBA) runs per engine + mode (default 2, 1 with --quick)")
    p.add_argument("--steps", type=int, help="timed steps per run (default 5, 2 with --quick)")
    p.add_argument("--warmup", type=int, help="warm-up steps per run (default 2, 1 with --quick)")
    p.add_argument("--model-dir", help="float32 Hugging Face directory (default: danlu's conversion of the "
                                       "bundled SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--retries", type=int, default=2, help="reruns of a run that other processes disturbed")
    p.add_argument("--busy-threshold", type=float, default=0.1,
                   help="other processes' CPU share above which a run counts as disturbed (default 0.1)")
    p.add_argument("--max-wait", type=float, default=300, help="seconds to wait for an idle machine per run")
    p.add_argument("--worker", choices=["danlu", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=list(ENGINES), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    if args.worker:
        print(json.dumps(worker(args.worker, args.mode, args.model_dir, warmup, steps)))
        return {}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    model_dir = model_directory(args.model_dir)
    info = {**machine_info(), **versions()}
    ppo_check = trl_has_ppo()
    print(f"CPU: {info['cpu']} | cores: {info['cores']} | RAM: {info['ram_gb']} GB | python {info['python']} | "
          f"torch {info['torch']} ({info['torch_threads']} threads) | transformers {info['transformers']} | "
          f"peft {info['peft']} | trl {info['trl']} | datasets {info['datasets']} | accelerate {info['accelerate']} "
          f"| danlu {info['danlu']}")
    print(f"model: {model_dir} (float32, CPU) | LoRA r={RANK} alpha={ALPHA} on {','.join(ALL_LINEAR)} | AdamW lr {LR} "
          f"| warm-up {warmup}, timed {steps} steps per run, {rounds} interleaved round(s) | one fresh process "
          f"per engine, mode and round")
    print(f"PPO peer: trl {ppo_check['trl']} has PPOTrainer: {ppo_check['trl.PPOTrainer']}; trl.experimental PPO "
          f"modules: {ppo_check['trl.experimental ppo'] or 'none'} -> PPO runs danlu alone\n", flush=True)
    results = {"machine": info, "ppo_peer_check": ppo_check, "model_dir": str(model_dir), "lr": LR, "beta": BETA,
               "warmup_steps": warmup, "timed_steps": steps, "rounds": rounds, "quick": args.quick, "runs": {},
               "summary": {}}
    for mode in modes:
        engines = ENGINES[mode]
        results["runs"][mode] = {e: [] for e in engines}
        for round_ in range(1 if mode == "kernels" else rounds):
            for engine in (engines if round_ % 2 == 0 else engines[::-1]):
                print(f"{mode}: {engine} (round {round_ + 1}) ...", flush=True)
                r = run_measured(engine, mode, model_dir, warmup, steps, args)
                results["runs"][mode][engine].append(r)
                if mode != "kernels":
                    print(f"   {statistics.median(s['step'] for s in r['samples']):.2f} s/step, peak RSS "
                          f"{mib(r['peak_rss'])} MiB (process {r['process_seconds']:.0f} s; other processes used "
                          f"{r['foreign_cpu']:.0%} of the CPU meanwhile)", flush=True)
        if mode != "kernels":
            results["summary"][mode] = {e: pooled(runs, args.busy_threshold)
                                         for e, runs in results["runs"][mode].items()}
    print()
    print_table(results["summary"])
    print_phases(results["summary"])
    print_runs(results)
    print_kernels(results)
    foreign = {f"{m}/{e}#{i + 1}": r["disturbed"] for m, runs in results["runs"].items()
               for e, rs in runs.items() for i, r in enumerate(rs)}
    print()
    print_foreign_load(foreign, "run")
    save_results(results, args.json)
    return results


if __name__ == "__main__":
    main()
