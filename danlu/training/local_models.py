"""`danlu train --parallel local=K` under torchrun (K processes): K workers train local models apart and aggregate
them every `sync_every` steps, by parameter averaging (local SGD) or by ensemble-compression
(danlu/distributed/aggregation.py; MSRA, seed 003).

Each worker reads its own shard of every epoch (`--shuffle global | local`), takes its own optimizer steps on its
own loss (no gradient is exchanged) and keeps its own optimizer state; at every sync_every-th step the trainable
parameters are averaged over the workers, or gathered into an ensemble that each worker's next steps distil
from (the ensemble's members are the models as of that aggregation). Rank 0 logs its local loss, evaluates,
checkpoints and saves its model: under `average` the final model is the workers' average (aggregated once more
at the end), under `ensemble` rank 0's local model, compressed from the last ensemble. A checkpoint holds rank
0's model and optimizer state: a resumed run starts every worker from them (every rank reads the checkpoint; the
workers' models are equal there after an averaging, so save_steps a multiple of sync_every resumes exactly); an
ensemble starts empty again until the next aggregation. A fresh run's workers start from one model (one seed).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from danlu.distributed.aggregation import Ensemble, average_parameters, gather_parameters
from danlu.distributed.mesh import process_group
from danlu.training.arguments import TrainArguments
from danlu.training.recipes.ensemble import ensemble_compression_stage, ensemble_objective
from danlu.training.stage import Stage
from danlu.training.topology import Topology
from danlu.utils.progress import logger


def train_local_models(args: TrainArguments, topology: Topology, resume_from: Optional[Path]):
    from danlu.training.train import train_in

    with process_group(topology.device, args.ddp_backend, args.ddp_timeout):
        logger.info("local models: %d workers, aggregated by %s every %d steps", topology.world_size,
                    args.aggregate, args.sync_every)
        return train_in(args, replace(topology, apart=True), resume_from, apart=LocalModels(args))


class LocalModels:
    """What train_in asks of a run of local models: its stage, the aggregation after a step, and the end."""

    def __init__(self, args: TrainArguments):
        self.args = args
        self.ensemble = None
        self.parameters: list = []

    def stage(self, model, stage: Stage) -> Stage:
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if self.args.aggregate != "ensemble":
            return stage
        self.ensemble = Ensemble(model)
        return ensemble_compression_stage(stage, self.ensemble, ensemble_objective(self.args,
                                                                                    model.config.num_hidden_layers))

    def after_step(self, step: int) -> None:
        if step % self.args.sync_every == 0:
            self.aggregate()

    def aggregate(self) -> None:
        if self.ensemble is None:
            average_parameters(self.parameters)
        else:
            self.ensemble.set_members(gather_parameters(self.parameters))

    def finish(self, step: int) -> None:
        if self.ensemble is None and step % self.args.sync_every:
            average_parameters(self.parameters)
