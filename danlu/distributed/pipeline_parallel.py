"""Pipeline parallel: consecutive layers on consecutive ranks of mesh["pp"], the micro-batches of an optimizer
step flowing through them on torch.distributed.pipelining's schedules (GPipe: every forward, then every
backward; 1F1B: one forward, one backward, so a stage holds at most pp micro-batches' activations).

- A stage is the model with what it does not hold removed (`keep_stage`): the blocks keep their names
  (model.layers.7 stays model.layers.7), so checkpoints and exports name each weight as one process does.
  The first stage holds the embedding, the last the final norm and the head.
- A tied head (SmolLM2) is a copy of the embedding on the last stage: before each optimizer step the two
  gradients are summed over the first and the last stage (Megatron's embedding group), so both copies take
  the step one process takes on the one matrix, and stay equal.
- The micro-batches of a step are the accumulation micro-batches (gradient_accumulation_steps of them, as
  Megatron's micro-batches), padded on the right to one shape, since the stages exchange activations of a
  fixed shape: padding has no label and, attention being causal, changes no real token's output.
- Micro-batch i's loss is its summed token cross-entropy x dp / (its labelled tokens over the dp ranks x the
  micro-batches): what the training loop's share weighting makes of it without pp, so the curve is the one
  of one process.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from danlu.data.supervised import IGNORE_INDEX
from danlu.distributed.layout import PIPELINE_SCHEDULES
from danlu.models.pipeline_stages import stage_layers
from danlu.models.transformer import Transformer
from danlu.training.losses import labelled_tokens, summed_causal_lm_loss
from danlu.training.stage import StepOutput


def schedule_class(name: str) -> type:
    """torch's schedule class for a PIPELINE_SCHEDULES name. torch.distributed.pipelining is imported here rather
    than with this module: it pulls in torch._dynamo, half a second that every run without a pipeline would pay."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    return dict(zip(PIPELINE_SCHEDULES, (Schedule1F1B, ScheduleGPipe)))[name]


@dataclass(frozen=True)
class PipelineSettings:
    schedule: str = "1f1b"  # one of PIPELINE_SCHEDULES
    micro_batches: int = 1  # per optimizer step: gradient_accumulation_steps
    rows: int = 1  # per micro-batch: per_device_train_batch_size
    sequence_length: int = 1024  # every micro-batch padded to it: cutoff_len
    pad_id: int = 0
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None

    def stages(self, num_layers: int, pp: int) -> list[range]:
        return stage_layers(num_layers, pp, self.first_stage_layers, self.last_stage_layers)


def keep_stage(model: nn.Module, layers: range, first: bool, last: bool) -> None:
    """Remove from `model`, in place, what the stage holding `layers` does not: the other blocks, the embeddings
    unless it is the first stage, the final norm and the head unless it is the last. A tied head stays on the
    last stage as the embedding matrix's copy."""
    blocks = model.model.layers._modules
    for name in [name for name, block in blocks.items() if block.layer_idx not in layers]:
        del blocks[name]
    if not first:
        decoder = model.model
        decoder.embed_tokens = decoder.embed_positions = decoder.embed_token_types = decoder.embed_norm = None
    if not last:
        model.model.norm = model.lm_head = model.pooler = None


def tied_embedding_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """The process group of the first and the last stage of this rank's pipeline (a collective: every rank
    makes every such group, in the same order)."""
    pipelines = mesh.mesh.reshape(mesh.mesh.shape[0], -1).T  # [pp, dp, fsdp, tp] ranks -> one row per pipeline
    mine = None
    for pipeline in pipelines.tolist():
        group = dist.new_group([pipeline[0], pipeline[-1]])
        if dist.get_rank() in (pipeline[0], pipeline[-1]):
            mine = group
    return mine


class Pipeline:
    """This rank's stage of the pipeline and the schedule that runs an optimizer step's micro-batches."""

    def __init__(self, stage_module: nn.Module, mesh: DeviceMesh, settings: PipelineSettings, device: torch.device):
        if settings.schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"pipeline_schedule must be one of {', '.join(PIPELINE_SCHEDULES)}, "
                             f"got {settings.schedule!r}")
        pp = mesh["pp"]
        self.module, self.config = stage_module, stage_module.config
        self.rank, self.size, self.group = pp.get_local_rank(), pp.size(), pp.get_group()
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.stages = settings.stages(self.config.num_hidden_layers, self.size)
        self.micro_batches, self.rows = settings.micro_batches, settings.rows
        self.sequence_length, self.pad_id = settings.sequence_length, settings.pad_id
        # Static shapes (every micro-batch padded to rows x sequence_length): no inference pass at the first step
        inputs, outputs = self._activation_shapes(device)
        from torch.distributed.pipelining import PipelineStage

        self.stage = PipelineStage(stage_module, self.rank, self.size, device, input_args=inputs,
                                   output_args=outputs, input_grads=None if self.first else inputs,
                                   output_grads=None if self.last else outputs, group=self.group)
        self.schedule = schedule_class(settings.schedule)(self.stage, self.micro_batches, loss_fn=self._loss,
                                                          scale_grads=False)
        self.tied = self.config.tie_word_embeddings and self.size > 1
        self.tied_group = tied_embedding_group(mesh) if self.tied else None
        self._scales: deque[float] = deque()
        self._scale_loss: Callable = lambda loss: loss
        self._step_loss = 0.0

    def _activation_shapes(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples (on the meta device) of what this stage takes and gives for one micro-batch: token ids or
        hidden states in, hidden states or logits out."""
        shape, dtype = (self.rows, self.sequence_length), next(self.module.parameters()).dtype
        hidden = torch.empty(*shape, self.config.hidden_size, dtype=dtype, device="meta")
        # a received activation needs its gradient, to send back to the stage before
        inputs = torch.empty(shape, dtype=torch.long, device="meta") if self.first else hidden.requires_grad_()
        outputs = torch.empty(*shape, self.config.vocab_size, dtype=dtype, device="meta") if self.last else hidden
        return inputs, outputs

    @property
    def tied_weight(self) -> Optional[nn.Parameter]:
        """The tied matrix this stage holds (the embedding on the first stage, its copy as the head on the last)."""
        if not self.tied:
            return None
        if self.first:
            return self.module.model.embed_tokens.weight
        return self.module.lm_head.weight if self.last else None

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = summed_causal_lm_loss(logits, labels) * self._scales.popleft()
        self._step_loss += loss.item()
        return self._scale_loss(loss)

    def forward_backward(self, micro_batches: list[dict], data_parallel_size: int, summed_over_ranks: Callable,
                         scale_loss: Callable) -> tuple[list[StepOutput], float]:
        """Run the schedule over one optimizer step's micro-batches (backward included); their StepOutputs and the
        step's loss on this rank's data (what summed over the dp ranks and divided by dp is the logged loss)."""
        counts = [labelled_tokens(b["labels"]) for b in micro_batches]
        totals = summed_over_ranks(*counts)
        n = len(micro_batches)
        self._scales = deque(data_parallel_size / (total * n) if total > 0 else 0.0 for total in totals)
        self._scales.extend([0.0] * (self.micro_batches - n))  # a short last group: empty micro-batches
        self._scale_loss, self._step_loss = scale_loss, 0.0
        self._run(micro_batches, self.schedule.step)
        if self.last and self._scales:
            raise RuntimeError(f"the pipeline schedule computed {self.micro_batches - len(self._scales)} losses "
                               f"for {self.micro_batches} micro-batches")
        loss = self._from_last_stage(self._step_loss)
        self.sum_tied_gradients()
        outputs = [StepOutput(torch.zeros(()), int(b["attention_mask"].sum()), weight=count)
                   for b, count in zip(micro_batches, counts)]
        return outputs, loss

    @torch.no_grad()
    def evaluate(self, data: Sequence, collate: Callable[[list], dict]) -> dict[str, float]:
        """{"eval_loss": the token-mean cross-entropy over `data`} on every stage, forward only through the
        pipeline, micro_batches x rows examples at a time (the shapes it was built for)."""
        was_training = self.module.training
        self.module.eval()
        summed, count, chunk = 0.0, 0, self.micro_batches * self.rows
        for start in range(0, len(data), chunk):
            examples = [data[i] for i in range(start, min(start + chunk, len(data)))]
            batches = [collate(examples[i:i + self.rows]) for i in range(0, len(examples), self.rows)]
            count += sum(labelled_tokens(b["labels"]) for b in batches)
            self._scales, self._scale_loss, self._step_loss = deque([1.0] * self.micro_batches), lambda x: x, 0.0
            self._run(batches, self.schedule.eval)
            summed += self._step_loss
        self.module.train(was_training)
        return {"eval_loss": self._from_last_stage(summed) / max(count, 1)}

    def _run(self, micro_batches: list[dict], run: Callable) -> None:
        """`run` (the schedule's step or eval) over the micro-batches, each stage given what it takes."""
        input_ids = self._padded([b["input_ids"] for b in micro_batches], self.pad_id)
        labels = self._padded([b["labels"] for b in micro_batches], IGNORE_INDEX)
        if self.first:
            run(input_ids, target=labels if self.last else None)
        elif self.last:
            run(target=labels)
        else:
            run()

    def _from_last_stage(self, value: float) -> float:
        """A number the last stage computed (0 elsewhere), on every stage."""
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total, group=self.group)
        return float(total)

    def _padded(self, tensors: list[torch.Tensor], value: int) -> torch.Tensor:
        """The micro-batches as one [micro_batches x rows, sequence_length] tensor, padded on the right and below
        (and with empty micro-batches up to the schedule's count)."""
        length, rows = self.sequence_length, self.rows
        if max(t.shape[1] for t in tensors) > length:
            raise ValueError(f"a micro-batch of {max(t.shape[1] for t in tensors)} tokens exceeds the pipeline's "
                             f"sequence length {length} (cutoff_len)")
        out = torch.full((self.micro_batches * rows, length), value, dtype=tensors[0].dtype)
        for i, t in enumerate(tensors):
            out[i * rows:i * rows + t.shape[0], :t.shape[1]] = t
        return out

    def sum_tied_gradients(self) -> None:
        weight = self.tied_weight
        if weight is None or not weight.requires_grad:
            return
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        dist.all_reduce(local, group=self.tied_group)
        weight.grad = grad

    def clip_grad_norm_(self, parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip by the norm of every stage's gradients together (the tied matrix counted once, on the first
        stage), as one process clips the whole model's."""
        copy = self.tied_weight if self.tied and self.last and not self.first else None
        grads = [p.grad for p in parameters if p.grad is not None and p is not copy]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared = (norm.double() ** 2).reshape(1)
        dist.all_reduce(squared, group=self.group)
        total = squared.sqrt().to(norm.dtype).reshape(())
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return total


    def gathered_on_first(self, value) -> Optional[list]:
        """`value` of every stage, in stage order, on the first stage (None on the others); a collective."""
        values = [None] * self.size if self.first else None
        dist.gather_object(value, values, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return values

    def stage_state(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """This stage's weights by their names in the whole model, whole (gathered over tensor parallel: a
        collective) and on the CPU."""
        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
                for name, p in self.module.named_parameters() if p.requires_grad or not trainable_only}

    def whole_model(self, prepare: Callable[[nn.Module], None]) -> Optional[nn.Module]:
        """On the main rank, the whole model with every stage's weights (`prepare` gives a fresh model the
        stages' structure, e.g. LoRA's modules, before they are loaded); None elsewhere. A collective."""
        states = self.gathered_on_first(self.stage_state())
        if dist.get_rank() != 0:
            return None
        with torch.device("meta"):  # no weights of its own: it takes the gathered tensors as they are
            whole = Transformer(self.config)
            prepare(whole)
        merged = {name: tensor for state in states for name, tensor in state.items()}
        if self.tied:  # the head's copy of the embedding is the embedding
            merged["lm_head.weight"] = merged["model.embed_tokens.weight"]
        whole.load_state_dict(merged, strict=True, assign=True)
        whole.tie_weights()
        return whole

    # ------------------------------------------------------------ checkpoints (collectives)

    def trainable_state(self) -> Optional[dict[str, torch.Tensor]]:
        """Every stage's trainable weights by name, on the first stage, as one process holds them (the tied head
        is the embedding: left out); None on the other stages."""
        states = self.gathered_on_first(self.stage_state(trainable_only=True))
        if not self.first:
            return None
        merged = {name: tensor for state in states for name, tensor in state.items()}
        if self.tied:
            merged.pop("lm_head.weight", None)
        return merged

    def stage_trainable(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This stage's trainable weights out of a whole checkpoint's (the tied head from the embedding)."""
        wanted = [name for name, p in self.module.named_parameters() if p.requires_grad]
        return {name: saved["model.embed_tokens.weight" if self.tied and name == "lm_head.weight" else name]
                for name in wanted if name in saved or (self.tied and name == "lm_head.weight")}

    def optimizer_states(self, optimizer: torch.optim.Optimizer) -> Optional[dict]:
        """Each stage's optimizer state, in stage order, with the stages' layers, on the first stage."""
        saved = optimizer.state_dict()
        saved["state"] = {index: {key: value.full_tensor().cpu() if isinstance(value, DTensor) else value
                                  for key, value in values.items()} for index, values in saved["state"].items()}
        states = self.gathered_on_first(saved)  # whole tensors: tensor parallel shards them again on a resume
        return {"stages": [[r.start, r.stop] for r in self.stages], "optimizers": states} if self.first else None

    def stage_optimizer_state(self, saved: dict, source) -> dict:
        """This stage's optimizer state out of what optimizer_states saved; ValueError (naming `source`) when it
        was saved with other stages."""
        mine = [[r.start, r.stop] for r in self.stages]
        if not isinstance(saved, dict) or saved.get("stages") != mine:
            had = saved.get("stages") if isinstance(saved, dict) else "no pipeline"
            raise ValueError(f"{source}: saved with pipeline stages {had}, this run has {mine}: resume it with the "
                             f"same --parallel pp and stage layers")
        return saved["optimizers"][self.rank]
