"""`danlu train` arguments, with LLaMA-Factory's names and meanings so its commands run unchanged.

A YAML file and `--key value` flags both fill one TrainArguments; flags override the file. Unknown keys
and wrong values fail before any work starts, naming the key (and the close match).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from danlu.distributed.layout import (PIPELINE_SCHEDULES, LayoutError, ParallelLayout, deepspeed_zero_stage,
                                     parse_parallel, resolve_layout)
from danlu.distributed.mesh import BACKENDS
from danlu.distributed.aggregation import AGGREGATIONS
from danlu.distributed.parameter_server.rules import UPDATE_RULES
from danlu.training.order import SHUFFLES
from danlu.training.activation_checkpointing import MODES as ACTIVATION_CHECKPOINTING
from danlu.utils.progress import logger

STAGES = ("sft", "pt", "rm", "dpo", "kto", "ppo", "kd")
PREF_LOSSES = ("sigmoid", "hinge", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")  # DPO variants that need no reference model
FINETUNING_TYPES = ("lora", "freeze", "full")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw_torch", "adamw_hf", "sgd")
STRATEGIES = ("no", "steps", "epoch")


class ArgumentError(ValueError):
    """A training argument is unknown or has a value it cannot take."""


def ignored(default: Any, why: str):
    """A LLaMA-Factory key that danlu accepts but that changes nothing here; setting it says so, once."""
    return field(default=default, metadata={"ignored": why})


def refused(default: Any, why: str):
    """A LLaMA-Factory key whose effect danlu does not have: any value but the default fails, saying why."""
    return field(default=default, metadata={"refused": why})


def check_refused(arguments) -> None:
    """Fail on the first `refused` key of an arguments dataclass that is set to anything but its default."""
    for f in dataclasses.fields(arguments):
        value = getattr(arguments, f.name)
        if "refused" in f.metadata and value != f.default:
            raise ArgumentError(f"{f.name}: {value!r} is not supported: {f.metadata['refused']}")


_SAID_IGNORED: set[tuple[str, str]] = set()


def _say_ignored(cls, given: dict[str, Any]) -> None:
    for f in dataclasses.fields(cls):
        why = f.metadata.get("ignored")
        if why and f.name in given and given[f.name] != f.default and (cls.__name__, f.name) not in _SAID_IGNORED:
            _SAID_IGNORED.add((cls.__name__, f.name))
            logger.warning("%s: %r is accepted for LLaMA-Factory compatibility and ignored: %s", f.name,
                           given[f.name], why)


@dataclass
class TrainArguments:
    # model
    model_name_or_path: Optional[str] = None  # None: the bundled SmolLM2-135M-Instruct
    adapter_name_or_path: Optional[str] = None
    template: Optional[str] = None
    default_system: Optional[str] = None  # replaces the template's default system prompt
    enable_thinking: bool = True  # reasoning templates (qwen3): train answers with their thoughts
    preserve_thinking: bool = False
    flash_attn: str = "auto"
    trust_remote_code: bool = ignored(False, "danlu runs no code from a checkpoint; its one model covers the "
                                             "families it reads")
    train_from_scratch: bool = False  # keep the architecture and tokenizer, start from init_weights()
    # method
    stage: str = "sft"
    do_train: bool = True
    finetuning_type: str = "lora"
    lora_rank: int = 8
    lora_alpha: Optional[float] = None  # None: 2 x lora_rank, as LLaMA-Factory
    lora_dropout: float = 0.0
    lora_target: str = "all"
    additional_target: Optional[str] = None
    freeze_trainable_layers: int = 2
    freeze_trainable_modules: str = "all"
    quantization_bit: Optional[int] = None
    gradient_checkpointing: bool = False  # LLaMA-Factory's name for activation_checkpointing full
    # each block keeps its inputs only (full), or its linears' outputs too (selective: recomputes the attention
    # core, Megatron's --recompute-activations); None: full with gradient_checkpointing, else none
    activation_checkpointing: Optional[str] = None
    # data
    dataset: Optional[str] = None
    eval_dataset: Optional[str] = None
    dataset_dir: str = "data"
    cutoff_len: int = 1024
    max_samples: Optional[int] = None
    val_size: float = 0.0
    packing: Optional[bool] = None
    train_on_prompt: bool = False
    overwrite_cache: bool = ignored(False, "danlu's token cache is keyed by the files' contents and the "
                                           "tokenizer, so a stale cache is never read")
    preprocessing_num_workers: Optional[int] = ignored(None, "data is tokenized in the main process")
    dataloader_num_workers: int = ignored(0, "batches are collated in the main process")
    skip_bad_lines: bool = False
    # optimisation
    learning_rate: float = 5e-5
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    sgd_momentum: float = 0.9
    fp16: bool = False
    bf16: bool = False
    seed: int = 42
    # evaluation, saving, logging
    eval_strategy: str = "no"
    evaluation_strategy: Optional[str] = None  # the older name of eval_strategy
    eval_steps: Optional[int] = None
    load_best_model_at_end: bool = False
    output_dir: str = "saves/run"
    overwrite_output_dir: bool = False
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    logging_steps: int = 10
    report_to: str = "none"
    plot_loss: bool = False
    # parallel training under torchrun (danlu.distributed): "dp=2,fsdp=1,tp=1,pp=1", their product the world
    # size; unset: dp = WORLD_SIZE. Or LLaMA-Factory's deepspeed: a ZeRO config mapped onto DDP/FSDP2.
    parallel: Optional[str] = None
    deepspeed: Optional[str] = None
    ddp_timeout: Optional[int] = None  # seconds a collective may wait; None: torch's default (30 minutes)
    ddp_backend: Optional[str] = None  # gloo | nccl; None: nccl on GPUs, gloo on the CPU
    ddp_find_unused_parameters: Optional[bool] = None  # DDP: let parameters that got no gradient pass
    # pp > 1: torch.distributed.pipelining's schedule, and the layers of the first / last stage (Megatron's
    # decoder_first/last_pipeline_num_layers; None: the layers split evenly)
    pipeline_schedule: str = "1f1b"  # 1f1b | gpipe
    pipeline_first_stage_layers: Optional[int] = None
    pipeline_last_stage_layers: Optional[int] = None
    # ps=K: a parameter server and K free-running workers (danlu/distributed/parameter_server): how the server
    # applies their gradients (ssgd | asgd | dcasgd-c | dcasgd-a), DC-ASGD's lambda (lambda_0 for dcasgd-a) and
    # mean-square momentum, staleness injected for experiments, and when a silent worker is taken as lost
    ps_update: str = "asgd"
    dc_lambda: float = 0.04
    dc_momentum: float = 0.95
    ps_delay: int = 0
    ps_worker_timeout: float = 60.0
    # local=K: K workers train local models apart and aggregate them every sync_every steps: by parameter
    # averaging, or by ensemble-compression (the next steps distil each local model towards the workers'
    # ensemble with the kd loss: kd_alpha, kd_temperature, kd_divergence)
    sync_every: int = 16
    aggregate: str = "average"
    # how the data-parallel workers' shards are drawn each epoch: global (the whole set reshuffled and split
    # again) or local (split once; each worker reshuffles its own shard)
    shuffle: str = "global"
    include_num_input_tokens_seen: bool = False
    save_only_model: bool = ignored(False, "checkpoints always keep the optimizer and scheduler state, "
                                           "so that any of them can be resumed")
    loss_chunk_size: int = 0  # > 0: the head and cross-entropy run this many labelled tokens at a time
    # preference training (rm, dpo, kto, ppo): LLaMA-Factory's RLHFArguments
    pref_beta: float = 0.1
    pref_ftx: float = 0.0  # weight of the SFT loss on the chosen answers, added to DPO / KTO
    pref_loss: str = "sigmoid"
    dpo_label_smoothing: float = 0.0  # cDPO's epsilon, sigmoid loss only
    simpo_gamma: float = 0.5
    kto_chosen_weight: float = 1.0
    kto_rejected_weight: float = 1.0
    pref_bco_weight: float = refused(0.0, "BCO's running-mean reward baseline is not implemented")
    ld_alpha: Optional[float] = refused(None, "LD-DPO's verbosity weighting is not implemented")
    ref_model: Optional[str] = None  # default: the model itself, its adapters off (LoRA) or a frozen copy
    ref_model_adapters: Optional[str] = None
    ref_model_quantization_bit: Optional[int] = None
    reward_model: Optional[str] = None
    reward_model_adapters: Optional[str] = None
    reward_model_quantization_bit: Optional[int] = None
    reward_model_type: str = "lora"  # lora | full | rule (danlu's: reward_model is e.g. contains:WORD)
    ppo_buffer_size: int = 1
    ppo_epochs: int = 4
    ppo_score_norm: bool = False
    ppo_target: float = 6.0
    ppo_whiten_rewards: bool = False
    # PPO rollouts and on-policy KD's student answers: LLaMA-Factory's generating arguments (its defaults)
    do_sample: bool = True
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    max_new_tokens: int = 1024
    repetition_penalty: float = 1.0
    num_beams: int = refused(1, "rollouts are sampled, never decoded by beam search")
    # distillation (kd): danlu's keys. A method's weights left unset take its published defaults
    # (danlu.distillation.objective.METHOD_WEIGHTS); setting one another method does not use is an error.
    teacher_model: Optional[str] = None  # default: model_name_or_path itself (with student_layers)
    teacher_adapters: Optional[str] = None  # LoRA adapters merged into the teacher
    kd_method: str = "kd"  # kd | pkd_skip | pkd_last | distilbert | tinybert | dynabert
    kd_stage: str = "sft"  # the data and hard-label loss: sft (chat answers) or pt (text blocks)
    kd_task: str = "embedding"  # an encoder teacher's task: embedding (sentence vectors) or classification
    kd_temperature: Optional[float] = None  # None: 2.0 (kd, pkd, distilbert), 1.0 (tinybert)
    kd_divergence: str = "ce"  # ce | forward_kl | reverse_kl | jsd (GKD's generalized JSD)
    kd_jsd_beta: float = 0.5
    kd_alpha: Optional[float] = None  # kd, pkd: (1 - alpha) hard loss + alpha T^2 soft loss; 0.5
    kd_beta: Optional[float] = None  # pkd: weight of the intermediate-layer loss; 100
    kd_ce_weight: Optional[float] = None  # distilbert: L_ce, L_clm, L_cos weights; 5, 2, 1
    kd_lm_weight: Optional[float] = None
    kd_cos_weight: Optional[float] = None
    kd_attention_weight: Optional[float] = None  # tinybert: 1 each; kd_prediction_weight 0 is general distillation
    kd_hidden_weight: Optional[float] = None
    kd_embedding_weight: Optional[float] = None
    kd_prediction_weight: Optional[float] = None
    layer_map: Optional[str] = None  # "1:2,2:4": student layer -> teacher layer (0 = embeddings)
    # on-policy KD (GKD, TRL's lmbda): the share of micro-batches whose answers the student writes itself
    # (sampled with the generating arguments above), the teacher then scoring every token of them
    kd_lmbda: float = 0.0
    # dynabert: the widths trained at every step, then (a second run from the first's output) the depths too
    dynabert_widths: str = "1.0,0.75,0.5,0.25"
    dynabert_depths: str = "1.0"  # "1.0,0.75,0.5" for the depth-adaptive run
    dynabert_importance_batches: int = 8  # batches that estimate head and neuron importance before rewiring
    student_layers: Optional[int] = None  # cut a student of N evenly spaced blocks from model_name_or_path

    def __post_init__(self) -> None:
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        if self.eval_steps is None:
            self.eval_steps = self.save_steps
        if self.activation_checkpointing is None:
            self.activation_checkpointing = "full" if self.gradient_checkpointing else "none"
        self.validate()

    def validate(self) -> None:
        check_refused(self)
        check_choice("stage", self.stage, STAGES)
        check_choice("finetuning_type", self.finetuning_type, FINETUNING_TYPES)
        check_choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        check_choice("optim", self.optim, OPTIMIZERS)
        check_choice("eval_strategy", self.eval_strategy, STRATEGIES)
        check_choice("flash_attn", self.flash_attn, ("auto", "disabled", "sdpa", "fa2"))
        check_choice("report_to", self.report_to, ("none", "tensorboard", "all"))
        check_choice("activation_checkpointing", self.activation_checkpointing, ACTIVATION_CHECKPOINTING)
        if self.gradient_checkpointing and self.activation_checkpointing != "full":
            raise ArgumentError(f"gradient_checkpointing True means activation_checkpointing full, but "
                                f"activation_checkpointing is {self.activation_checkpointing}; set only one")
        for key in ("quantization_bit", "ref_model_quantization_bit", "reward_model_quantization_bit"):
            if getattr(self, key) not in (None, 4, 8):
                raise ArgumentError(f"{key} must be 4 or 8 (or unset), got {getattr(self, key)}")
        if self.quantization_bit is not None and self.finetuning_type != "lora":
            raise ArgumentError("quantization_bit needs finetuning_type lora (QLoRA trains adapters on a "
                                "quantized base)")
        if not self.dataset and self.do_train:
            raise ArgumentError("dataset is required: a name from dataset_info.json in dataset_dir "
                                "(comma-separated for several)")
        positive = ("cutoff_len", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "lora_rank", "logging_steps", "save_steps", "eval_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ArgumentError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.val_size < 1 and not (self.val_size >= 1 and float(self.val_size).is_integer()):
            raise ArgumentError(f"val_size must be a fraction in [0, 1) or a whole number of examples, "
                                f"got {self.val_size}")
        self.validate_schedule()
        if not 0 <= self.warmup_ratio < 1:
            raise ArgumentError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.fp16 and self.bf16:
            raise ArgumentError("fp16 and bf16 are both set; choose one")
        if self.loss_chunk_size < 0:
            raise ArgumentError(f"loss_chunk_size must be 0 (off) or positive, got {self.loss_chunk_size}")
        if self.load_best_model_at_end and self.eval_strategy == "no":
            raise ArgumentError("load_best_model_at_end needs eval_strategy steps or epoch (and val_size > 0)")
        self.validate_parallel()
        self.validate_preference()
        self.validate_distillation()

    def validate_schedule(self) -> None:
        """The numbers that set how long and how hard the run trains: a run they make empty or meaningless
        (no steps, a negative rate, a nan) is refused before anything loads, naming the key and its value."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ArgumentError(f"{f.name} must be a finite number, got {value}")
        if self.max_steps < -1:
            raise ArgumentError(f"max_steps must be a positive number of optimizer steps, or -1 (the default) to "
                                f"train num_train_epochs epochs; got {self.max_steps}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ArgumentError(f"num_train_epochs must be positive (or set max_steps), got {self.num_train_epochs}: "
                                f"the run would take no training step")
        if self.learning_rate <= 0:
            raise ArgumentError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ArgumentError(f"warmup_steps must be 0 (off: warmup_ratio decides) or positive, got "
                                f"{self.warmup_steps}")
        if self.weight_decay < 0:
            raise ArgumentError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            raise ArgumentError(f"max_grad_norm must be positive (or 0: no clipping, as in transformers), got "
                                f"{self.max_grad_norm}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ArgumentError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.adam_epsilon < 0 or self.sgd_momentum < 0:
            raise ArgumentError(f"adam_epsilon and sgd_momentum must be >= 0, got adam_epsilon={self.adam_epsilon}, "
                                f"sgd_momentum={self.sgd_momentum}")
        if not 0 <= self.lora_dropout < 1:
            raise ArgumentError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ArgumentError(f"max_samples must be positive (or unset: every example), got {self.max_samples}")
        if self.save_total_limit is not None and self.save_total_limit < 0:
            raise ArgumentError(f"save_total_limit must be positive (or 0 or unset: keep every checkpoint), got "
                                f"{self.save_total_limit}")

    def validate_parallel(self) -> None:
        """The layout's keys and the deepspeed file, before any work (its product is checked against the world
        size by `parallel_layout`, once the processes are running)."""
        check_choice("ddp_backend", self.ddp_backend, (None, *BACKENDS))
        check_choice("pipeline_schedule", self.pipeline_schedule, PIPELINE_SCHEDULES)
        check_choice("ps_update", self.ps_update, UPDATE_RULES)
        check_choice("aggregate", self.aggregate, AGGREGATIONS)
        check_choice("shuffle", self.shuffle, SHUFFLES)
        if self.sync_every < 1:
            raise ArgumentError(f"sync_every must be a positive number of steps, got {self.sync_every}")
        if self.dc_lambda < 0:
            raise ArgumentError(f"dc_lambda must be >= 0, got {self.dc_lambda}")
        if not 0 <= self.dc_momentum < 1:
            raise ArgumentError(f"dc_momentum must be in [0, 1), got {self.dc_momentum}")
        if self.ps_delay < 0:
            raise ArgumentError(f"ps_delay must be a number of updates >= 0, got {self.ps_delay}")
        if self.ps_worker_timeout <= 0:
            raise ArgumentError(f"ps_worker_timeout must be a positive number of seconds, got "
                                f"{self.ps_worker_timeout}")
        if self.ddp_timeout is not None and self.ddp_timeout <= 0:
            raise ArgumentError(f"ddp_timeout must be a positive number of seconds, got {self.ddp_timeout}")
        try:
            if self.parallel and self.deepspeed:
                resolve_layout(self.parallel, self.deepspeed, 1)  # names the conflict
            layout = ParallelLayout(**parse_parallel(self.parallel)) if self.parallel else ParallelLayout()
            if layout.ps or layout.local:
                self.validate_apart(layout)
            if self.deepspeed:
                deepspeed_zero_stage(self.deepspeed)
        except LayoutError as e:
            raise ArgumentError(str(e)) from None

    def validate_apart(self, layout: ParallelLayout) -> None:
        """What a parameter-server run (one gradient per batch, pushed and applied) and local models do not do."""
        if layout.ps and (self.stage == "ppo" or (self.stage == "kd" and self.kd_lmbda)):
            what = "ppo" if self.stage == "ppo" else "on-policy distillation (kd_lmbda)"
            raise ArgumentError(f"parallel {self.parallel}: a parameter-server run pushes one gradient per batch; "
                                f"{what} takes several steps per rollout and does not run on it")
        if layout.local and self.aggregate == "ensemble" and self.stage not in ("pt", "sft"):
            raise ArgumentError(f"parallel {self.parallel}: aggregate ensemble distils the workers' next-token "
                                f"distributions; it runs stages pt and sft, not {self.stage}")
        if layout.local and self.stage == "ppo":
            raise ArgumentError(f"parallel {self.parallel}: local models do not run ppo")

    def parallel_layout(self, world_size: int) -> ParallelLayout:
        """The run's layout for `world_size` processes (from parallel, deepspeed, or dp = world_size)."""
        try:
            return resolve_layout(self.parallel, self.deepspeed, world_size)
        except LayoutError as e:
            raise ArgumentError(str(e)) from None

    def validate_preference(self) -> None:
        check_choice("pref_loss", self.pref_loss, PREF_LOSSES)
        check_choice("reward_model_type", self.reward_model_type, ("lora", "full", "rule"))
        if self.pref_beta <= 0:
            raise ArgumentError(f"pref_beta must be positive, got {self.pref_beta}")
        if not 0 <= self.dpo_label_smoothing <= 0.5:
            raise ArgumentError(f"dpo_label_smoothing must be in [0, 0.5], got {self.dpo_label_smoothing}")
        if self.dpo_label_smoothing and self.pref_loss != "sigmoid":
            raise ArgumentError("dpo_label_smoothing is only valid with pref_loss sigmoid")
        for key in ("ppo_buffer_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, key) <= 0:
                raise ArgumentError(f"{key} must be positive, got {getattr(self, key)}")
        if self.top_k < 0 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ArgumentError(f"sampling: top_k must be >= 0 (0: off), temperature >= 0, top_p in (0, 1] and "
                                f"repetition_penalty > 0; got top_k={self.top_k}, temperature={self.temperature}, "
                                f"top_p={self.top_p}, repetition_penalty={self.repetition_penalty}")
        if self.stage == "ppo" and not self.reward_model:
            raise ArgumentError("reward_model is necessary for PPO training: a LoRA reward adapter trained with "
                                "--stage rm (reward_model_type lora), a full reward model (full), or a rule such "
                                "as contains:WORD (rule)")
        if self.ref_model_adapters and not self.ref_model:
            raise ArgumentError("ref_model_adapters needs ref_model (the base the adapters belong to)")

    def validate_distillation(self) -> None:
        from danlu.distillation.encoder_tasks import TASKS
        from danlu.distillation.losses import DIVERGENCES
        from danlu.distillation.objective import METHOD_WEIGHTS, METHODS

        check_choice("kd_method", self.kd_method, METHODS)
        check_choice("kd_stage", self.kd_stage, ("sft", "pt"))
        check_choice("kd_task", self.kd_task, TASKS)
        check_choice("kd_divergence", self.kd_divergence, DIVERGENCES)
        weight_keys = {key for keys in METHOD_WEIGHTS.values() for key in keys}
        for key in sorted(weight_keys):
            value = getattr(self, key)
            if value is None:
                continue
            if key not in METHOD_WEIGHTS[self.kd_method]:
                users = [m for m, keys in METHOD_WEIGHTS.items() if key in keys]
                raise ArgumentError(f"{key} applies to kd_method {' or '.join(users)}, not {self.kd_method}")
            if value < 0 or (key == "kd_alpha" and value > 1):
                raise ArgumentError(f"{key} must be {'in [0, 1]' if key == 'kd_alpha' else '>= 0'}, got {value}")
        if self.kd_temperature is not None and self.kd_temperature <= 0:
            raise ArgumentError(f"kd_temperature must be positive, got {self.kd_temperature}")
        if not 0 <= self.kd_jsd_beta <= 1:
            raise ArgumentError(f"kd_jsd_beta must be in [0, 1], got {self.kd_jsd_beta}")
        if not 0 <= self.kd_lmbda <= 1:
            raise ArgumentError(f"kd_lmbda (the share of on-policy micro-batches) must be in [0, 1], got "
                                f"{self.kd_lmbda}")
        if self.student_layers is not None and self.student_layers <= 0:
            raise ArgumentError(f"student_layers must be positive, got {self.student_layers}")
        self.multipliers("dynabert_widths"), self.multipliers("dynabert_depths")
        if self.dynabert_importance_batches <= 0:
            raise ArgumentError(f"dynabert_importance_batches must be positive, got {self.dynabert_importance_batches}")
        if self.stage != "kd":
            return
        if self.kd_lmbda and (self.kd_stage != "sft" or self.packing or self.kd_method == "dynabert"):
            raise ArgumentError(f"kd_lmbda {self.kd_lmbda}: on-policy answers replace the answers of chat "
                                f"prompts, so they need kd_stage sft without packing and a method other than "
                                f"dynabert (got kd_stage {self.kd_stage}, packing {self.packing}, kd_method "
                                f"{self.kd_method})")
        if self.teacher_adapters and not self.teacher_model:
            raise ArgumentError("teacher_adapters needs teacher_model (the base the adapters belong to)")
        if self.kd_method == "dynabert":
            if self.finetuning_type != "full" or self.student_layers:
                raise ArgumentError("kd_method dynabert trains the whole model at every width and depth: use "
                                    "finetuning_type full and no student_layers (dynabert_depths sets the depths)")
            return
        if not self.teacher_model and not self.student_layers:
            raise ArgumentError("stage kd needs a teacher: teacher_model PATH, or student_layers N to cut a student "
                                "from model_name_or_path and learn from it")
        if self.student_layers and self.finetuning_type != "full":
            raise ArgumentError("student_layers makes a new, smaller model: train it with finetuning_type full "
                                "(an adapter would have no base model to load onto)")

    def generation_config(self):
        """The generating arguments as danlu.generation's GenerationConfig (greedy when do_sample is false)."""
        from danlu.generation.sampling import GenerationConfig

        return GenerationConfig(max_new_tokens=self.max_new_tokens,
                                temperature=self.temperature if self.do_sample else 0.0, top_k=self.top_k,
                                top_p=self.top_p, repetition_penalty=self.repetition_penalty)

    def multipliers(self, key: str) -> tuple[float, ...]:
        """A comma-separated list of DynaBERT width or depth multipliers, each in (0, 1], 1.0 included."""
        try:
            values = tuple(float(v) for v in getattr(self, key).split(","))
        except ValueError:
            raise ArgumentError(f"{key}: expected comma-separated numbers such as 1.0,0.5, got "
                                f"{getattr(self, key)!r}") from None
        if not all(0 < v <= 1 for v in values) or 1.0 not in values:
            raise ArgumentError(f"{key}: every multiplier must be in (0, 1] and 1.0 must be among them, "
                                f"got {getattr(self, key)!r}")
        return values

    @property
    def uses_reference(self) -> bool:
        """Whether the stage compares with a frozen reference model (DPO but ORPO/SimPO, KTO, PPO)."""
        return self.stage in ("kto", "ppo") or (self.stage == "dpo" and self.pref_loss not in REFERENCE_FREE)

    def names(self, key: str) -> list[str]:
        """A comma-separated key (dataset, eval_dataset, ...) as a list of names."""
        return [name.strip() for name in (getattr(self, key) or "").split(",") if name.strip()]


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ArgumentError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}{hint}")


# ---------------------------------------------------------------- parsing


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(key: str, raw: Any, kind: Any) -> Any:
    optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(float(raw)) if isinstance(raw, str) and "e" in raw.lower() else int(raw)
        if kind is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        expected = {bool: "True or False", int: "an integer", float: "a number"}.get(kind, "a string")
        raise ArgumentError(f"{key}: expected {expected}, got {raw!r}") from None


def parse_train_arguments(argv: list[str]) -> TrainArguments:
    return parse_arguments(argv, TrainArguments)


def parse_arguments(argv: list[str], cls):
    """`[CONFIG.yaml] [--key value | --key=value ...]` -> an arguments dataclass; flags override the file."""
    values: dict[str, Any] = {}
    args = list(argv)
    if args and not args[0].startswith("--"):
        values.update(read_yaml_config(args.pop(0)))
    values.update(_parse_flags(args))
    types = _field_types(cls)
    unknown = [k for k in values if k not in types]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, types, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ArgumentError(f"unknown argument {key!r}{hint}")
    converted = {k: _convert(k, v, types[k]) for k, v in values.items()}
    parsed = cls(**converted)
    _say_ignored(cls, converted)
    return parsed


def read_yaml_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ArgumentError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ArgumentError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from e
    if not isinstance(data, dict):
        raise ArgumentError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def _parse_flags(args: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise ArgumentError(f"expected --key value, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"  # a bare --flag means True
        values[key.replace("-", "_")] = value
        i += 1
    return values
