"""Local SGD on K workers: ensemble-compression vs parameter averaging, and global vs local shuffling (MSRA
article, seed 003, experiments (2) and (3)).

    python bench/bench_local_sgd.py [--quick] [--experiment ensemble,shuffle] [--workers K] [--epochs E]
        [--seeds S] [--periods 1,4,16,64,256] [--inits same,different] [--ensemble_splits iid,noniid]
        [--alpha A] [--temperature T] [--shuffle_periods 1,16] [--hidden H] [--batch_size B] [--lr LR]
        [--json OUT] [--plots DIR]

--quick: 2 seeds, 12 epochs, same initialisation, iid shards for (2), synchronous SGD only for (3) (about a
minute or two here); otherwise 5 seeds, 30 epochs, both initialisations.

Common to both experiments (small enough to repeat over several seeds on a laptop, offline):
  * data: scikit-learn's bundled digits (1797 8x8 images, 10 classes), a fixed stratified 80/20 train/test split
    (random_state 0: 1437 / 360), standardised with the training part's mean and std;
  * model: an MLP 64-H-10 (ReLU, H = --hidden, 128), cross-entropy, plain SGD (no momentum, no weight decay,
    learning rate --lr 0.3, constant), per-worker batch --batch_size (16); at lr 0.1 the 12-30 epochs of the
    budget leave the K-worker runs (22 steps per epoch) visibly under-trained;
  * K = --workers (4) processes spawned on this machine (danlu.distributed.parameter_server.local.run_locally),
    a gloo process group, one thread each; the aggregation is danlu.distributed.aggregation's
    (average_parameters, gather_parameters, Ensemble), applied to the parameters laid out in one flat buffer
    (one collective per aggregation); the KD loss is danlu.distillation.losses.divergence("ce");
  * the same data budget everywhere: --epochs E passes over the training set. Every worker takes
    n_train // (K x B) batches (22) per epoch from its shard (the few examples left over are dropped; which ones
    changes with each epoch's shuffle), so the K workers together read one epoch per epoch;
  * shards: `iid` = a random permutation cut into K equal parts; `noniid` = the training set sorted by label (the
    classes in a random order, ties in random order) cut into K parts, so each worker holds 2-3 classes.

(2) --experiment ensemble: ensemble-compression vs parameter averaging as the communication period H grows.
    Fixed shards (--ensemble_splits, iid by default), shuffled locally each epoch. Every worker trains its own
    model with plain SGD; every H local steps the workers aggregate:
      average    average_parameters: every worker continues from the mean of the K models;
      ensemble   gather_parameters -> an Ensemble teacher (the log of the mean of the K softmaxes); each worker
                 keeps its OWN weights and trains the next H steps on
                 (1 - alpha) CE(labels) + alpha T^2 soft-CE(student, ensemble at temperature T)
                 (the article's step 3, the compression folded into local training; the ensemble of the
                 previous aggregation labels each of the worker's batches);
      none       no communication (K independent models; at the end also their one-shot ensemble and one-shot
                 average, H = infinity);
      sequential one model on the whole training set, the same epochs, batch B (K times the steps of a worker).
    Evaluated at the end of the budget (E x 22 local steps, then one last aggregation): average -> the averaged
    model (and the local models just before that averaging); ensemble -> the local models after compression
    (worker 0's, and the mean over the K workers) and, for reference, the ensemble of the K final models (K
    times the size). At every aggregation worker 0's model just before and the aggregate just after (the
    averaged model; the ensemble) are evaluated too: their difference, the "jump" (after - before, percentage
    points), shows what an averaging costs (the article's instability) and what the ensemble adds.
    --inits same (every worker starts from the same weights) and/or different (each worker its own
    initialisation: models in different basins, which averaging parameters mixes at the first aggregation).
(3) --experiment shuffle: data-parallel synchronous SGD (average_parameters after every step, --shuffle_periods
    1; for plain SGD the same as all-reducing the gradients, global batch K x B), every worker starting from the
    same weights; shards
      global  each epoch the whole training set is reshuffled and re-split into K shards (noniid: the class order
              is redrawn each epoch, so a worker sees other classes each epoch), then shuffled locally;
      local   split once into K fixed shards, each shuffled locally per epoch;
    x iid / noniid (epoch 1 is the same split either way). Test error and training loss (the objective the
    article's bound is about: mean cross-entropy on the whole training set) of the averaged model after every
    epoch. A period > 1 (local SGD; the averaged model is evaluated without averaging the run) shows where the
    shard layout starts to matter.

Reported per configuration: the final test error, mean ± std over seeds, per seed; curves per epoch. Markdown
tables on stdout, --json OUT (machine, settings, results), --plots DIR (PNGs: local_sgd_ensemble_vs_average
(test error vs H), local_sgd_aggregation_rounds (before/after each aggregation at the largest H with at least 4
of them), local_sgd_shuffling (test error and training loss vs epochs)). Other processes' share of the CPU is
printed per experiment (only accuracy is measured here, not speed: a busy machine only slows the run down).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from digits import CLASSES, build_mlp, build_sgd, load_digits_split
from machine import ForeignLoad, machine_info, print_foreign_load, save_results  # noqa: E402

from danlu.distillation.losses import divergence  # noqa: E402
from danlu.distributed.aggregation import Ensemble, average_parameters, gather_parameters  # noqa: E402
from danlu.distributed.parameter_server.local import run_locally  # noqa: E402

EXPERIMENTS = ("ensemble", "shuffle")
METHODS = ("average", "ensemble")
SHUFFLES = ("global", "local")
SPLITS = ("iid", "noniid")


# ---------------------------------------------------------------- data and model (shared helpers)

@torch.no_grad()
def test_error(model: torch.nn.Module, data: dict) -> float:
    return (model(data["x_test_t"]).argmax(1) != data["y_test_t"]).float().mean().item()


@torch.no_grad()
def training_loss(model: torch.nn.Module, data: dict) -> float:
    """The objective itself: mean cross-entropy over the whole training set."""
    return F.cross_entropy(model(data["x_train_t"]), data["y_train_t"]).item()


def as_tensors(data: dict) -> dict:
    return {**data, **{f"{k}_t": torch.from_numpy(v) for k, v in data.items()}}


def partition(labels: np.ndarray, workers: int, split: str, rng: np.random.Generator) -> list[np.ndarray]:
    """K disjoint shards of the training indices: iid = a random permutation cut into K; noniid = sorted by label
    (the classes in a random order, ties in random order), then cut into K (each worker holds ~10/K classes)."""
    order = rng.permutation(len(labels))
    if split == "noniid":
        class_rank = rng.permutation(CLASSES)
        order = order[np.argsort(class_rank[labels[order]], kind="stable")]
    elif split != "iid":
        raise ValueError(f"unknown split {split!r}")
    return np.array_split(order, workers)


def batches_per_epoch(n_train: int, workers: int, batch_size: int) -> int:
    return n_train // (workers * batch_size)


def shard_of_epoch(labels: np.ndarray, workers: int, rank: int, split: str, shuffle: str, seed: int,
                   epoch: int) -> np.ndarray:
    """This worker's shard in epoch `epoch`: global re-splits every epoch, local keeps epoch 0's split; either way
    the shard is then shuffled locally (seeded by seed, rank, epoch)."""
    split_epoch = epoch if shuffle == "global" else 0
    shard = partition(labels, workers, split, np.random.default_rng([seed, 1, split_epoch]))[rank]
    return np.random.default_rng([seed, 2, epoch, rank]).permutation(shard)


def worker_batches(data: dict, workers: int, rank: int, batch_size: int, split: str, shuffle: str, seed: int,
                   epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This worker's batches of one epoch (batches_per_epoch of them)."""
    shard = shard_of_epoch(data["y_train"], workers, rank, split, shuffle, seed, epoch)
    for j in range(batches_per_epoch(len(data["y_train"]), workers, batch_size)):
        index = torch.from_numpy(shard[j * batch_size:(j + 1) * batch_size])
        yield data["x_train_t"][index], data["y_train_t"][index]


def sequential_batches(data: dict, batch_size: int, seed: int, epoch: int) -> Iterator[tuple]:
    """One model on the whole training set: a fresh permutation per epoch, full batches only."""
    order = np.random.default_rng([seed, 3, epoch]).permutation(len(data["y_train"]))
    for j in range(len(order) // batch_size):
        index = torch.from_numpy(order[j * batch_size:(j + 1) * batch_size])
        yield data["x_train_t"][index], data["y_train_t"][index]


def sgd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def compression_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, alpha: float,
                     temperature: float) -> torch.Tensor:
    """(1 - alpha) CE(labels) + alpha T^2 soft-CE(student, teacher) (Hinton's KD; the T^2 is the caller's)."""
    soft = divergence("ce", logits, teacher_logits, temperature)
    return (1 - alpha) * F.cross_entropy(logits, labels) + alpha * temperature ** 2 * soft


@torch.no_grad()
def averaged_copy(model: torch.nn.Module, members: list[list[torch.Tensor]]) -> torch.nn.Module:
    """A copy of `model` holding the mean of the members' parameters."""
    averaged = copy.deepcopy(model)
    for i, p in enumerate(averaged.parameters()):
        p.copy_(torch.stack([member[i] for member in members]).mean(0))
    return averaged


def ensemble_error(model: torch.nn.Module, members: list[list[torch.Tensor]], data: dict) -> float:
    ensemble = Ensemble(model)
    ensemble.set_members(members)
    return test_error(ensemble, data)


def flatten_parameters(model: torch.nn.Module) -> torch.Tensor:
    """Make the model's parameters views into one flat buffer (as DDP's buckets do) and return it: one
    collective per aggregation instead of one per tensor (4 processes share 2 cores here, and a collective
    costs far more than this MLP's arithmetic). SGD updates the parameters in place, hence the buffer."""
    parameters = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in parameters])
    offset = 0
    for p in parameters:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def unflatten(flat: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    """The per-parameter views of a flat buffer laid out as flatten_parameters lays out `model`'s."""
    shapes = [p.shape for p in model.parameters()]
    return [part.view(shape) for part, shape in zip(flat.split([s.numel() for s in shapes]), shapes)]


def gather_models(flat: torch.Tensor, model: torch.nn.Module) -> list[list[torch.Tensor]]:
    """Every worker's parameters (rank order), each as the per-parameter list Ensemble.set_members takes."""
    return [unflatten(member[0], model) for member in gather_parameters([flat])]


def gather_floats(value: float) -> list[float]:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def mean_of(values: list[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------- (2) ensemble-compression vs averaging

def init_seed(seed: int, init: str, rank: int) -> int:
    return 1000 * seed + (rank if init == "different" else 0)


def train_local_models(data: dict, s: dict, seed: int, init: str, method: str, period: Optional[int],
                       split: str) -> dict:
    """One run of experiment (2) on this worker: method average / ensemble every `period` local steps, or none.
    Collective: every worker calls it with the same arguments. Returns the errors (the same on every worker)."""
    rank, workers = dist.get_rank(), dist.get_world_size()
    model = build_mlp(s["hidden"], init_seed(seed, init, rank))
    flat = flatten_parameters(model)
    optimizer = build_sgd(model, s["lr"])
    teacher = Ensemble(model) if method == "ensemble" else None
    distilling, step, curve = False, 0, []
    rounds = {"step": [], "local_before": [], "aggregated": []}  # worker 0's view of every aggregation
    for epoch in range(s["epochs"]):
        for x, y in worker_batches(data, workers, rank, s["batch_size"], split, "local", seed, epoch):
            logits = model(x)
            if distilling:
                loss = compression_loss(logits, y, teacher(x), s["alpha"], s["temperature"])
            else:
                loss = F.cross_entropy(logits, y)
            sgd_step(model, optimizer, loss)
            step += 1
            if method != "none" and step % period == 0:
                before = test_error(model, data) if rank == 0 else None
                if method == "average":
                    average_parameters([flat])
                else:
                    teacher.set_members(gather_models(flat, model))
                    distilling = True
                if rank == 0:
                    record_round(rounds, step, before, test_error(model if method == "average" else teacher, data))
        curve.append(test_error(model, data))  # worker's own model (averaged only if the epoch ended on H)
    local = gather_floats(test_error(model, data))
    members = gather_models(flat, model)
    result = {"local_worker0": local[0], "local_mean": mean_of(local), "local_per_worker": local,
              "ensemble_of_final": ensemble_error(model, members, data),
              "average_of_final": test_error(averaged_copy(model, members), data),
              "steps": step, "curve_worker0": from_rank0(curve)}
    if method == "average":
        result["aggregated"] = result["average_of_final"]  # the last averaging, at the end of the budget
    rounds = from_rank0(rounds)
    if method == "none" or step % period:  # the aggregation at the end of the budget is one more
        record_round(rounds, step, local[0], result["ensemble_of_final" if method == "ensemble"
                                                   else "average_of_final"])
    result["rounds"] = rounds
    return result


def record_round(rounds: dict, step: int, local_before: float, aggregated: float) -> None:
    """One aggregation seen from worker 0: its model's test error just before, and the aggregate's (the
    averaged model, or the ensemble of the K models)."""
    rounds["step"].append(step)
    rounds["local_before"].append(local_before)
    rounds["aggregated"].append(aggregated)


def from_rank0(value):
    """Rank 0's `value` on every worker (collective)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_sequential(data: dict, s: dict, seed: int) -> dict:
    """One model on the whole training set (not collective)."""
    model = build_mlp(s["hidden"], init_seed(seed, "same", 0))
    optimizer = build_sgd(model, s["lr"])
    curve, step = [], 0
    for epoch in range(s["epochs"]):
        for x, y in sequential_batches(data, s["batch_size"], seed, epoch):
            sgd_step(model, optimizer, F.cross_entropy(model(x), y))
            step += 1
        curve.append(test_error(model, data))
    return {"error": curve[-1], "curve": curve, "steps": step}


def sequential_baseline(data: dict, s: dict) -> dict:
    """Seeds dealt to the workers (rank r runs seeds r, r + K, ...), gathered on every worker: seed -> result."""
    rank, workers = dist.get_rank(), dist.get_world_size()
    mine = {seed: train_sequential(data, s, seed) for seed in s["seeds"][rank::workers]}
    everyone = [None] * workers
    dist.all_gather_object(everyone, mine)
    return {seed: r for part in everyone for seed, r in part.items()}


def ensemble_configurations(s: dict) -> list[tuple[str, str, str, Optional[int]]]:
    """(split, init, method, period) of every run of experiment (2), the baseline `none` first."""
    runs = []
    for split in s["ensemble_splits"]:
        for init in s["inits"]:
            runs.append((split, init, "none", None))
            runs += [(split, init, method, period) for period in s["periods"] for method in METHODS]
    return runs


def configuration_key(split: str, init: str, method: str, period: Optional[int]) -> str:
    return f"{split}/{init}/{method}" + ("" if period is None else f"/H={period}")


def ensemble_worker(rank: int, workers: int, data: dict, s: dict, out: str) -> None:
    """Experiment (2) in one of the K processes; rank 0 writes the results to `out`."""
    with worker_group():
        data = as_tensors(data)
        results = {"sequential": sequential_baseline(data, s)}
        started = time.perf_counter()
        for split, init, method, period in ensemble_configurations(s):
            key = configuration_key(split, init, method, period)
            results[key] = {seed: train_local_models(data, s, seed, init, method, period, split)
                            for seed in s["seeds"]}
            if rank == 0:
                errors = [r.get("aggregated", r["local_mean"]) for r in results[key].values()]
                print(f"   {key:32s} {100 * mean_of(errors):5.2f}%  ({time.perf_counter() - started:.0f} s)",
                      flush=True)
        if rank == 0:
            Path(out).write_text(json.dumps(results))


# ---------------------------------------------------------------- (3) global vs local shuffling

def train_data_parallel(data: dict, s: dict, seed: int, shuffle: str, split: str, period: int) -> dict:
    """One run of experiment (3): every worker starts from the same weights, averages the parameters every
    `period` steps (1: synchronous SGD); the averaged model's test error and training loss after every epoch.
    Collective."""
    rank, workers = dist.get_rank(), dist.get_world_size()
    model = build_mlp(s["hidden"], init_seed(seed, "same", rank))
    flat = flatten_parameters(model)
    optimizer = build_sgd(model, s["lr"])
    curve, loss_curve, step = [], [], 0
    for epoch in range(s["epochs"]):
        for x, y in worker_batches(data, workers, rank, s["batch_size"], split, shuffle, seed, epoch):
            sgd_step(model, optimizer, F.cross_entropy(model(x), y))
            step += 1
            if step % period == 0:
                average_parameters([flat])
        # evaluate the average without averaging the run
        averaged = model if step % period == 0 else averaged_copy(model, gather_models(flat, model))
        curve.append(test_error(averaged, data))
        loss_curve.append(training_loss(averaged, data))
    return {"error": curve[-1], "curve": curve, "train_loss": loss_curve[-1], "loss_curve": loss_curve,
            "steps": step}


def shuffle_configurations(s: dict) -> list[tuple[int, str, str]]:
    return [(period, split, shuffle) for period in s["shuffle_periods"] for split in SPLITS for shuffle in SHUFFLES]


def shuffle_key(period: int, split: str, shuffle: str) -> str:
    return f"H={period}/{split}/{shuffle}"


def shuffle_worker(rank: int, workers: int, data: dict, s: dict, out: str) -> None:
    """Experiment (3) in one of the K processes; rank 0 writes the results to `out`."""
    with worker_group():
        data = as_tensors(data)
        results, started = {}, time.perf_counter()
        for period, split, shuffle in shuffle_configurations(s):
            key = shuffle_key(period, split, shuffle)
            results[key] = {seed: train_data_parallel(data, s, seed, shuffle, split, period) for seed in s["seeds"]}
            if rank == 0:
                print(f"   {key:24s} {100 * mean_of([r['error'] for r in results[key].values()]):5.2f}%  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
        if rank == 0:
            Path(out).write_text(json.dumps(results))


class worker_group:
    """The gloo process group of run_locally's processes (env://), one thread per process."""

    def __enter__(self):
        torch.set_num_threads(1)
        dist.init_process_group("gloo")

    def __exit__(self, *exc):
        dist.destroy_process_group()


# ---------------------------------------------------------------- running, summarising

def run_experiment(worker, data: dict, s: dict, timeout: float) -> tuple[dict, float]:
    """`worker` in K processes; (rank 0's results, other processes' share of the CPU meanwhile)."""
    with tempfile.TemporaryDirectory() as scratch, ForeignLoad() as load:
        out = str(Path(scratch) / "results.json")
        codes = run_locally(worker, s["workers"], (data, s, out), timeout=timeout)
        if any(code != 0 for code in codes):
            raise RuntimeError(f"worker processes ended with {codes} (None: killed after {timeout} s)")
        results = json.loads(Path(out).read_text())
    return results, load.share


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "per_seed": values}


def mean_curve(curves: list[list[float]]) -> dict:
    array = np.array(curves, dtype=float)
    return {"mean": array.mean(0).tolist(), "min": array.min(0).tolist(), "max": array.max(0).tolist()}


ENSEMBLE_METRICS = {  # method -> the figures reported for it
    "average": ("aggregated", "local_mean"),
    "ensemble": ("local_worker0", "local_mean", "ensemble_of_final"),
    "none": ("local_mean", "local_worker0", "ensemble_of_final", "average_of_final"),
}


def summarise_ensemble(raw: dict) -> dict:
    summary = {"sequential": {"error": spread([r["error"] for r in raw["sequential"].values()]),
                              "curve": mean_curve([r["curve"] for r in raw["sequential"].values()]),
                              "steps": next(iter(raw["sequential"].values()))["steps"]}}
    for key, runs in raw.items():
        if key == "sequential":
            continue
        method = key.split("/")[2]
        runs = list(runs.values())
        summary[key] = {metric: spread([r[metric] for r in runs]) for metric in ENSEMBLE_METRICS[method]}
        summary[key]["curve_worker0"] = mean_curve([r["curve_worker0"] for r in runs])
        if method != "none":
            summary[key]["jump_mean"] = spread([mean_of(aggregation_jumps(r["rounds"])) for r in runs])
            summary[key]["jump_worst"] = spread([max(aggregation_jumps(r["rounds"])) for r in runs])
            summary[key]["rounds"] = mean_rounds([r["rounds"] for r in runs])
        summary[key]["steps"] = runs[0]["steps"]
    return summary


def aggregation_jumps(rounds: dict) -> list[float]:
    """Per aggregation: the aggregate's test error minus worker 0's just before (positive: the aggregation hurt)."""
    return [after - before for before, after in zip(rounds["local_before"], rounds["aggregated"])]


def mean_rounds(rounds: list[dict]) -> dict:
    return {"step": rounds[0]["step"], "local_before": mean_curve([r["local_before"] for r in rounds])["mean"],
            "aggregated": mean_curve([r["aggregated"] for r in rounds])["mean"]}


def summarise_shuffle(raw: dict) -> dict:
    summary = {}
    for key, runs in raw.items():
        runs = list(runs.values())
        summary[key] = {"error": spread([r["error"] for r in runs]), "curve": mean_curve([r["curve"] for r in runs]),
                        "curves_per_seed": [r["curve"] for r in runs],
                        "train_loss": spread([r["train_loss"] for r in runs]),
                        "loss_curve": mean_curve([r["loss_curve"] for r in runs]),
                        "loss_curves_per_seed": [r["loss_curve"] for r in runs], "steps": runs[0]["steps"]}
    return summary


def pct(figure: dict) -> str:
    return f"{100 * figure['mean']:.2f} ± {100 * figure['std']:.2f}"


def points(figure: dict) -> str:
    """A difference of error rates in percentage points, mean over seeds."""
    return f"{100 * figure['mean']:+.2f}"


def markdown(header: tuple, lines: list[tuple]) -> str:
    rows = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    rows += ["| " + " | ".join(str(x) for x in line) + " |" for line in lines]
    return "\n".join(rows)


def ensemble_tables(summary: dict, s: dict) -> list[str]:
    tables = []
    for split in s["ensemble_splits"]:
        for init in s["inits"]:
            header = ("H (local steps between aggregations)", "aggregations (the last at the end)", "average: averaged model",
                      "average: local before averaging", "average: jump at an aggregation, mean / worst (pp)",
                      "ens.-compr.: worker 0", "ens.-compr.: mean of workers", "ensemble of K (reference, K x size)",
                      "ensemble - local at an aggregation, mean (pp)")
            lines = []
            for period in s["periods"]:
                avg = summary[configuration_key(split, init, "average", period)]
                ens = summary[configuration_key(split, init, "ensemble", period)]
                lines.append((period, -(-avg["steps"] // period), pct(avg["aggregated"]), pct(avg["local_mean"]),
                              f"{points(avg['jump_mean'])} / {points(avg['jump_worst'])}",
                              pct(ens["local_worker0"]), pct(ens["local_mean"]), pct(ens["ensemble_of_final"]),
                              points(ens["jump_mean"])))
            none = summary[configuration_key(split, init, "none", None)]
            lines.append(("∞ (no communication; one-shot at the end)", 0, pct(none["average_of_final"]),
                          pct(none["local_mean"]), "-", "-", pct(none["local_mean"]), pct(none["ensemble_of_final"]),
                          "-"))
            seq = summary["sequential"]
            lines.append((f"sequential SGD, all data ({seq['steps']} steps)", "-", pct(seq["error"]), "-", "-", "-",
                          "-", "-", "-"))
            tables.append(f"**{split} shards, {init} initialisation** (test error %, mean ± std over "
                          f"{len(s['seeds'])} seeds; {s['epochs']} epochs, {avg['steps']} local steps per worker)\n\n"
                          + markdown(header, lines))
    return tables


def checkpoints(epochs: int) -> list[int]:
    return sorted({1, max(1, epochs // 4), max(1, epochs // 2), epochs})


def at_epoch(curves_per_seed: list[list[float]], epoch: int) -> dict:
    values = [curve[epoch - 1] for curve in curves_per_seed]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def shuffle_tables(summary: dict, s: dict) -> list[str]:
    """Per period: the test error % and the training loss of the averaged model at a few epochs."""
    tables = []
    marks = checkpoints(s["epochs"])
    for period in s["shuffle_periods"]:
        header = ("shards", "shuffling", *[f"error % ep. {e}" for e in marks], "final error %: per seed",
                  *[f"train loss ep. {e}" for e in marks])
        lines = []
        for split in SPLITS:
            for shuffle in SHUFFLES:
                r = summary[shuffle_key(period, split, shuffle)]
                losses = [at_epoch(r["loss_curves_per_seed"], e) for e in marks]
                lines.append((split, shuffle, *[pct(at_epoch(r["curves_per_seed"], e)) for e in marks],
                              " ".join(f"{100 * v:.2f}" for v in r["error"]["per_seed"]),
                              *[f"{f['mean']:.4f} ± {f['std']:.4f}" for f in losses]))
        title = "synchronous SGD (average every step)" if period == 1 else f"local SGD, averaging every {period} steps"
        tables.append(f"**{title}** (the averaged model; mean ± std over {len(s['seeds'])} seeds; training loss = "
                      f"mean cross-entropy on the whole training set)\n\n" + markdown(header, lines))
    return tables


# ---------------------------------------------------------------- plots

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plain_log_ticks(ax) -> None:
    """Tick labels of a log-scale y axis as plain numbers (2, 3, 10) rather than 2 x 10^0; of the minor ticks
    only 2, 3 and 5 (x 10^k) are labelled."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _) -> str:
        if value <= 0:
            return ""
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:g}" if mantissa in (1, 2, 3, 5) else ""

    for setter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        setter(FuncFormatter(label))


def panel_grid(plt, s: dict):
    """One panel per (split, init) of experiment (2): splits in rows, initialisations in columns."""
    rows, columns = len(s["ensemble_splits"]), len(s["inits"])
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.5 * rows), squeeze=False)
    return fig, [(axes[i][j], split, init) for i, split in enumerate(s["ensemble_splits"])
                 for j, init in enumerate(s["inits"])]


def plot_ensemble(summary: dict, s: dict, directory: str) -> list[str]:
    plt = pyplot()
    fig, panels = panel_grid(plt, s)
    periods = np.array(s["periods"], dtype=float)
    for ax, split, init in panels:
        series = [("average", "aggregated", "parameter averaging (averaged model)", "-o"),
                  ("ensemble", "local_mean", "ensemble-compression (local model, mean of workers)", "-s"),
                  ("ensemble", "ensemble_of_final", "ensemble of K (reference, K x size)", ":^")]
        for method, metric, label, style in series:
            figures = [summary[configuration_key(split, init, method, p)][metric] for p in s["periods"]]
            ax.errorbar(periods, [100 * f["mean"] for f in figures], yerr=[100 * f["std"] for f in figures],
                        fmt=style, capsize=3, label=label)
        none = summary[configuration_key(split, init, "none", None)]
        ax.axhline(100 * none["local_mean"]["mean"], color="grey", linestyle="--",
                   label="no communication (local model)")
        ax.axhline(100 * summary["sequential"]["error"]["mean"], color="black", linestyle="-.",
                   label="sequential SGD, all data")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain_log_ticks(ax)
        ax.set_xlabel("H: local steps between aggregations")
        ax.set_ylabel("test error % (mean ± std over seeds; log scale)")
        ax.set_title(f"{split} shards, {init} initialisation", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"digits, MLP 64-{s['hidden']}-10, K={s['workers']}, {s['epochs']} epochs, "
                 f"alpha={s['alpha']}, T={s['temperature']}", fontsize=9)
    fig.tight_layout()
    path = str(Path(directory) / "local_sgd_ensemble_vs_average.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_rounds(summary: dict, s: dict, directory: str) -> list[str]:
    """At the largest H with 4 aggregations or more: worker 0's test error just before each aggregation and the
    aggregate's just after (the last one: at the end of the budget)."""
    plt = pyplot()
    period = max([p for p in s["periods"] if s["epochs"] * s["local_steps_per_epoch"] // p >= 4]
                 or [min(s["periods"])])
    fig, panels = panel_grid(plt, s)
    for ax, split, init in panels:
        for method, colour, before_label, after_label in (
                ("average", "tab:blue", "averaging: local model before", "averaging: averaged model"),
                ("ensemble", "tab:orange", "ens.-compr.: local model before", "ens.-compr.: ensemble of K")):
            r = summary[configuration_key(split, init, method, period)]["rounds"]
            ax.plot(r["step"], 100 * np.array(r["local_before"]), "o--", color=colour, label=before_label)
            ax.plot(r["step"], 100 * np.array(r["aggregated"]), "s-", color=colour, label=after_label)
        ax.set_ylim(0, None)
        ax.set_xlabel("local steps")
        ax.set_ylabel("test error % (worker 0)")
        ax.set_title(f"H={period}, {split} shards, {init} initialisation", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"at each aggregation, mean over {len(s['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    path = str(Path(directory) / "local_sgd_aggregation_rounds.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_shuffle(summary: dict, s: dict, directory: str) -> list[str]:
    """Per period (columns): test error (top) and training loss (bottom) of the averaged model vs epochs."""
    plt = pyplot()
    periods = s["shuffle_periods"]
    fig, axes = plt.subplots(2, len(periods), figsize=(6.5 * len(periods), 9), squeeze=False)
    epochs = np.arange(1, s["epochs"] + 1)
    styles = {"global": "-", "local": "--"}
    colours = {"iid": "tab:blue", "noniid": "tab:red"}
    for column, period in enumerate(periods):
        for row, (curve, scale, ylabel) in enumerate((("curve", 100, "test error % (log scale)"),
                                                      ("loss_curve", 1, "training loss (log scale)"))):
            ax = axes[row][column]
            for split in SPLITS:
                for shuffle in SHUFFLES:
                    c = summary[shuffle_key(period, split, shuffle)][curve]
                    ax.plot(epochs, scale * np.array(c["mean"]), styles[shuffle], color=colours[split],
                            label=f"{split}, {shuffle} shuffling")
                    ax.fill_between(epochs, scale * np.array(c["min"]), scale * np.array(c["max"]),
                                    color=colours[split], alpha=0.08, linewidth=0)
            ax.set_yscale("log")
            plain_log_ticks(ax)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.set_title("synchronous SGD (average every step)" if period == 1
                         else f"local SGD (average every {period} steps)", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"digits, MLP 64-{s['hidden']}-10, K={s['workers']}, batch {s['batch_size']} per worker, lr "
                 f"{s['lr']}; the averaged model, mean over {len(s['seeds'])} seeds, band: min-max", fontsize=9)
    fig.tight_layout()
    path = str(Path(directory) / "local_sgd_shuffling.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


# ---------------------------------------------------------------- main

def settings_from(args: argparse.Namespace, n_train: int) -> dict:
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    words = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    s = {"workers": args.workers, "epochs": args.epochs, "seeds": list(range(args.seeds)), "hidden": args.hidden,
         "batch_size": args.batch_size, "lr": args.lr, "alpha": args.alpha, "temperature": args.temperature,
         "periods": ints(args.periods), "inits": words(args.inits), "ensemble_splits": words(args.ensemble_splits),
         "shuffle_periods": ints(args.shuffle_periods), "experiments": words(args.experiment)}
    s["local_steps_per_epoch"] = batches_per_epoch(n_train, args.workers, args.batch_size)
    for name, allowed in (("inits", ("same", "different")), ("ensemble_splits", SPLITS), ("experiments", EXPERIMENTS)):
        unknown = set(s[name]) - set(allowed)
        if unknown:
            raise SystemExit(f"--{name}: unknown {sorted(unknown)}; choose from {list(allowed)}")
    return s


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, 12 epochs, same init only (~2-3 min)")
    p.add_argument("--experiment", default="ensemble,shuffle", help="ensemble and/or shuffle")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--epochs", type=int, help="epochs of data per run (default 30; --quick 12)")
    p.add_argument("--seeds", type=int, help="number of seeds (default 5; --quick 2)")
    p.add_argument("--periods", default="1,4,16,64,256", help="(2): local steps H between aggregations")
    p.add_argument("--inits", help="(2): same and/or different per-worker initialisation (default both; "
                                   "--quick same)")
    p.add_argument("--ensemble_splits", default="iid", help="(2): iid and/or noniid shards")
    p.add_argument("--alpha", type=float, default=0.6, help="(2): weight of the KD term")
    p.add_argument("--temperature", type=float, default=2.0, help="(2): KD temperature")
    p.add_argument("--shuffle_periods", default="1", help="(3): steps between averagings (1 = synchronous SGD)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16, help="per worker")
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per experiment before its processes die")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--plots", metavar="DIR", help="write PNGs into DIR (e.g. docs/figures)")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 12 if args.quick else 30
    if args.seeds is None:
        args.seeds = 2 if args.quick else 5
    if args.inits is None:
        args.inits = "same" if args.quick else "same,different"
    return args


def experiment_parts(name: str, s: dict):
    """(heading, worker, summarise, tables, plots) of experiment `name`."""
    if name == "ensemble":
        return (f"(2) ensemble-compression vs parameter averaging: H in {s['periods']}, inits {s['inits']}, "
                f"alpha {s['alpha']}, T {s['temperature']}", ensemble_worker, summarise_ensemble, ensemble_tables,
                lambda summary, directory: plot_ensemble(summary, s, directory) + plot_rounds(summary, s, directory))
    return (f"(3) global vs local shuffling, iid vs noniid shards: averaging every {s['shuffle_periods']} steps",
            shuffle_worker, summarise_shuffle, shuffle_tables,
            lambda summary, directory: plot_shuffle(summary, s, directory))


def run_and_report(name: str, data: dict, s: dict, args) -> tuple[dict, float]:
    """Run experiment `name`, print its tables (and write its plots); its results and the foreign CPU share."""
    heading, worker, summarise, tables, plots = experiment_parts(name, s)
    print(f"\n{heading}", flush=True)
    started = time.perf_counter()
    raw, share = run_experiment(worker, data, s, args.timeout)
    summary = summarise(raw)
    result = {"summary": summary, "seconds": time.perf_counter() - started}
    print()
    for table in tables(summary, s):
        print(table + "\n")
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        result["plots"] = plots(summary, args.plots)
    return result, share


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = load_digits_split()
    s = settings_from(args, len(data["y_train"]))
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    print(f"data: digits, {len(data['y_train'])} train / {len(data['y_test'])} test | MLP 64-{s['hidden']}-10 | "
          f"plain SGD lr {s['lr']} | K={s['workers']} workers, batch {s['batch_size']} each, "
          f"{s['local_steps_per_epoch']} local steps per epoch | {s['epochs']} epochs | seeds {s['seeds']}")
    report = {"machine": info, "settings": s, "results": {}}
    shares = {}
    for name in s["experiments"]:
        report["results"][name], shares[name] = run_and_report(name, data, s, args)
    print_foreign_load({k: round(v, 2) for k, v in shares.items()}, "experiment")
    for part in report["results"].values():
        for path in part.get("plots", []):
            print(f"wrote {path}")
    save_results(report, args.json)
    return report


if __name__ == "__main__":
    main()
