"""Encoder distillation retention: all-MiniLM-L6-v2 into 3 of its 6 blocks, every method side by side on both
kd_tasks, then the same embedding job run by TextBrewer (the peer library) for its time per step and its result.

    python bench/bench_distillation_encoder.py [--steps N] [--batch N] [--methods kd,pkd_skip,...] [--work DIR]
                                               [--no-peer] [--json OUT]

Setting. Teacher: the bundled all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384), float32 on the CPU. Every
student is the same 3 blocks cut from it (`--student_layers 3`: blocks 0, 2, 4), trained for the same steps on the
same data: `danlu train --stage kd --student_layers 3 --finetuning_type full`, AdamW lr 1e-4 (no weight decay),
constant schedule, max_grad_norm 1.0, batch --batch (16), cutoff_len 128, seed 42; each method with its published
default weights (danlu/distillation/objective.py, METHOD_WEIGHTS).

1. Embedding task (`--kd_task embedding --dataset danlu_text,danlu_topics`): the student learns the teacher's
   sentence embeddings (mean-pooled over the real tokens, L2-normalised; the soft term is the MSE of the two).
   Quality: the Spearman correlation of the student's pairwise cosine similarities with the teacher's over the
   220 held-out sentences of danlu.evaluation.embeddings.distillation_sentences (none trained on); the teacher is
   1.0 by definition, so retention = quality. This task has no labels without a teacher, so there is no
   "trained without KD" student: the baseline row is the cut student untrained.
2. Classification task (`--kd_task classification --dataset danlu_topics`, 4 topics): the teacher's head is a
   linear probe on its frozen embeddings (train split); the student starts with a copy of it and learns soft
   class logits at T (plus the labels' CE by the method's weights). Quality: accuracy and macro-F1 on the test
   split with the student's saved head; the teacher row is the teacher with its probe. "no KD" is the same student
   trained on the hard labels only (kd_method kd, kd_alpha 0). Retention = student accuracy / teacher accuracy.
3. TextBrewer (textbrewer.GeneralDistiller) on the embedding job: the same teacher (transformers' BertModel), the
   same 3-block student init (an HF BertModel with num_hidden_layers 3 holding copies of blocks 0, 2, 4, dropout
   off as in danlu's models, no pooler), the same sentences in the same batches and order (danlu's epoch plan),
   tokenised in the loop by the same collate function, AdamW (fused, no weight decay, as danlu builds it) at the
   same lr, constant schedule, max_grad_norm 1.0. Its adaptor's 'logits' are the mean-pooled L2-normalised
   embeddings, kd_loss_type "mse", temperature 1, kd_loss_weight 0.5 = danlu's kd weight (kd_alpha 0.5) on that
   task: the two losses are computed on the first batch from the same init and printed. Timed: the training loop
   only (danlu's fit, TextBrewer's train), minus the time either spends writing checkpoints. danlu's run is
   repeated for this table right before TextBrewer's, so the two share the machine's state.

Latency: the median over 10 forward passes of a batch of 32 held-out sentences padded to 128 tokens, after 2
warm-up passes, torch's default threads. Size: float32 parameters of the encoder (a classifier head's 1,540 not
counted). "train s" is the whole `train()` call (model load, data, loop, final save), as in bench_distillation.py.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import ForeignLoad, machine_info, print_aligned, print_foreign_load, save_results  # noqa: E402

from danlu.checkpoints.bundled import ensure_bundled_encoder  # noqa: E402
from danlu.checkpoints.load import load_pretrained  # noqa: E402
from danlu.distillation.encoder_tasks import (evaluate_classifier, evaluate_embedding_student,  # noqa: E402
                                              load_classifier, train_linear_probe)
from danlu.distillation.layer_map import evenly_spaced_layers  # noqa: E402
from danlu.distillation.students import student_from_teacher  # noqa: E402
from danlu.evaluation.classification import read_labelled  # noqa: E402
from danlu.evaluation.embeddings import distillation_sentences  # noqa: E402
from danlu.models.pooling import sentence_embeddings, sentence_vectors  # noqa: E402
from danlu.models.transformer import count_parameters  # noqa: E402
from danlu.training.arguments import TrainArguments  # noqa: E402
from danlu.training.train import train  # noqa: E402

CUTOFF = 128
STUDENT_LAYERS = 3
LATENCY_BATCH = 32
SEED = 42
LR = 1e-4
MAX_GRAD_NORM = 1.0
EMBEDDING_DATA = "danlu_text,danlu_topics"
TOPICS = "data/danlu_topics.jsonl"
SEED_FIGURES = "DistilBERT keeps 97% of BERT-base at 60% of its size; TinyBERT-4 keeps 96.8% at 7.5x smaller (seed 002)"

BATCH = 16


def common_args(teacher_dir: Path, out: Path, steps: int, **extra) -> TrainArguments:
    values = dict(model_name_or_path=str(teacher_dir), stage="kd", student_layers=STUDENT_LAYERS,
                  finetuning_type="full", dataset_dir="data", learning_rate=LR, lr_scheduler_type="constant",
                  max_steps=steps, per_device_train_batch_size=BATCH, cutoff_len=CUTOFF, max_grad_norm=MAX_GRAD_NORM,
                  logging_steps=max(1, steps // 4), save_steps=10 ** 6, output_dir=str(out),
                  overwrite_output_dir=True, seed=SEED)
    values.update(extra)
    return TrainArguments(**values)


# ---------------------------------------------------------------- timing danlu's loop

@contextlib.contextmanager
def timed_danlu_loop(record: dict):
    """While active, record["loop_s"] is the time of the last `fit` (the training loop) minus its checkpoint
    writes, and record["steps"] its optimizer steps."""
    import danlu.training.loop as loop
    import danlu.training.train as train_module

    original_fit, original_save = train_module.fit, loop._Run.save
    saving = [0.0]

    def save(self):
        start = time.perf_counter()
        try:
            return original_save(self)
        finally:
            saving[0] += time.perf_counter() - start

    def fit(*a, **k):
        saving[0] = 0.0
        start = time.perf_counter()
        result = original_fit(*a, **k)
        record["loop_s"] = time.perf_counter() - start - saving[0]
        record["save_s"] = saving[0]
        record["steps"] = result.state.global_step
        return result

    train_module.fit, loop._Run.save = fit, save
    try:
        yield record
    finally:
        train_module.fit, loop._Run.save = original_fit, original_save


def run_danlu(args_: TrainArguments) -> tuple[float, dict]:
    """(wall seconds of the whole train() call, {loop_s, save_s, steps})."""
    record: dict = {}
    start = time.perf_counter()
    with timed_danlu_loop(record):
        train(args_)
    return time.perf_counter() - start, record


# ---------------------------------------------------------------- measures

def latency_batch(tokenizer, sentences: list[str]) -> dict:
    texts = (sentences * (LATENCY_BATCH // max(1, len(sentences)) + 1))[:LATENCY_BATCH]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=CUTOFF, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@torch.inference_mode()
def latency_ms(model, batch: dict, warmup: int = 2, runs: int = 10) -> float:
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        model(batch["input_ids"], attention_mask=batch["attention_mask"])
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def size_row(name: str, model, batch: dict) -> dict:
    model.eval()
    params = count_parameters(model)
    return {"name": name, "params": params, "size_mb": params * 4 / 1e6, "latency_ms": latency_ms(model, batch)}


def measure_embedding(name, model, teacher, tokenizer, held_out, batch, seconds=None, loop=None) -> dict:
    with ForeignLoad() as load:
        quality = evaluate_embedding_student(model.eval(), teacher, tokenizer, held_out)
        row = size_row(name, model, batch)
    return {**row, "spearman": quality, "retention": quality, "train_s": seconds,
            "loop_s": None if loop is None else loop["loop_s"], "foreign_load": round(load.share, 3)}


def measure_classifier(name, model, head, tokenizer, test, batch, teacher_accuracy, seconds=None, loop=None) -> dict:
    texts, labels = test
    with ForeignLoad() as load:
        scores = evaluate_classifier(model.eval(), head, tokenizer, texts, labels)
        row = size_row(name, model, batch)
    accuracy = scores["accuracy"]
    return {**row, **scores, "retention": accuracy / (teacher_accuracy or accuracy), "train_s": seconds,
            "loop_s": None if loop is None else loop["loop_s"], "foreign_load": round(load.share, 3)}


# ---------------------------------------------------------------- tables 1 and 2

def run_embedding(args, teacher_dir: Path, lm, held_out, batch) -> list[dict]:
    teacher, tokenizer = lm.model, lm.tokenizer
    rows = [measure_embedding("teacher all-MiniLM-L6-v2 (6 blocks)", teacher, teacher, tokenizer, held_out, batch)]
    cut = student_from_teacher(teacher, evenly_spaced_layers(STUDENT_LAYERS, teacher.config.num_hidden_layers))
    rows.append(measure_embedding("cut student, untrained (no KD)", cut, teacher, tokenizer, held_out, batch))
    print(f"  untrained cut student: Spearman {rows[-1]['spearman']:.4f}", flush=True)
    for method in args.methods:
        out = args.work / "embedding" / method
        seconds, loop = run_danlu(common_args(teacher_dir, out, args.steps, dataset=EMBEDDING_DATA,
                                              kd_method=method))
        student = load_pretrained(out, dtype="float32", device="cpu").model
        rows.append(measure_embedding(method, student, teacher, tokenizer, held_out, batch, seconds, loop))
        print(f"  embedding {method}: Spearman {rows[-1]['spearman']:.4f}, {seconds:.0f} s", flush=True)
    return rows


def run_classification(args, teacher_dir: Path, lm, batch) -> list[dict]:
    teacher, tokenizer = lm.model, lm.tokenizer
    texts, labels, names = read_labelled(TOPICS, "train")
    test = read_labelled(TOPICS, "test")[:2]
    vectors = sentence_embeddings(teacher, tokenizer, texts)
    probe = train_linear_probe(vectors, torch.tensor([names.index(label) for label in labels]), names)
    rows = [measure_classifier("teacher all-MiniLM-L6-v2 + linear probe", teacher, probe, tokenizer, test, batch,
                               None)]
    teacher_accuracy = rows[0]["accuracy"]
    runs = [("no KD (hard labels)", "no_kd", dict(kd_method="kd", kd_alpha=0.0))]
    runs += [(method, method, dict(kd_method=method)) for method in args.methods]
    for name, directory, extra in runs:
        out = args.work / "classification" / directory
        seconds, loop = run_danlu(common_args(teacher_dir, out, args.steps, dataset="danlu_topics",
                                              kd_task="classification", **extra))
        student = load_pretrained(out, dtype="float32", device="cpu").model
        rows.append(measure_classifier(name, student, load_classifier(out), tokenizer, test, batch, teacher_accuracy,
                                       seconds, loop))
        print(f"  classification {name}: accuracy {rows[-1]['accuracy']:.4f}, macro-F1 {rows[-1]['macro_f1']:.4f}, "
              f"{seconds:.0f} s", flush=True)
    return rows


def print_embedding(rows: list[dict]) -> None:
    header = ("model", "params", "MB (fp32)", "latency ms", "held-out Spearman", "retention", "train s")
    print_aligned(header, [(r["name"], f"{r['params'] / 1e6:.1f}M", f"{r['size_mb']:.0f}", f"{r['latency_ms']:.1f}",
                            f"{r['spearman']:.4f}", f"{r['retention']:.3f}",
                            "" if r["train_s"] is None else f"{r['train_s']:.0f}") for r in rows])


def print_classification(rows: list[dict]) -> None:
    header = ("model", "params", "MB (fp32)", "latency ms", "test accuracy", "macro-F1", "retention", "train s")
    print_aligned(header, [(r["name"], f"{r['params'] / 1e6:.1f}M", f"{r['size_mb']:.0f}", f"{r['latency_ms']:.1f}",
                            f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", f"{r['retention']:.3f}",
                            "" if r["train_s"] is None else f"{r['train_s']:.0f}") for r in rows])


# ---------------------------------------------------------------- table 3: TextBrewer

def hf_student(hf_teacher, layers: list[int]):
    """transformers' BertModel of the teacher's blocks `layers` (copies), no pooler, dropout off."""
    from transformers import BertModel

    config = hf_teacher.config.__class__.from_dict(hf_teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    student = BertModel(config, add_pooling_layer=False)
    state = {}
    for name, tensor in hf_teacher.state_dict().items():
        if name.startswith("pooler."):
            continue
        if name.startswith("encoder.layer."):
            index, rest = name[len("encoder.layer."):].split(".", 1)
            if int(index) not in layers:
                continue
            name = f"encoder.layer.{layers.index(int(index))}.{rest}"
        state[name] = tensor.detach().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise RuntimeError(f"student copy: missing {missing}, unexpected {unexpected}")
    return student


def embedding_adaptor(batch, outputs) -> dict:
    """TextBrewer's view of a BertModel's output: its 'logits' are the sentence embeddings."""
    return {"logits": sentence_vectors(outputs.last_hidden_state, batch["attention_mask"])}


class EpochPlanBatches:
    """danlu's batches of the embedding run, epoch after epoch (the order fit reads), collated when read."""

    def __init__(self, sentences, collate, seed: int, batch_size: int):
        self.sentences, self.collate, self.seed, self.batch_size = sentences, collate, seed, batch_size

    def __iter__(self):
        from danlu.training.order import epoch_plan
        from danlu.training.topology import Topology

        epoch = 0
        while True:
            groups, _ = epoch_plan(len(self.sentences), self.seed, epoch, self.batch_size, 1, Topology())
            for (batch,) in groups:
                yield self.collate([self.sentences[i] for i in batch])
            epoch += 1


def run_peer(args, teacher_dir: Path, lm, held_out) -> dict:
    import textbrewer
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    from transformers import AutoModel

    from danlu.distillation.objective import method_objective
    from danlu.training.recipes.kd_encoder import collate_sentences, embedding_data, encoder_objective, encoder_step

    teacher, tokenizer = lm.model, lm.tokenizer
    layers = evenly_spaced_layers(STUDENT_LAYERS, teacher.config.num_hidden_layers)
    job = common_args(teacher_dir, args.work / "peer" / "danlu", args.steps, dataset=EMBEDDING_DATA, kd_method="kd")
    sentences, _ = embedding_data(job)
    collate = lambda rows: collate_sentences(rows, tokenizer, CUTOFF)  # noqa: E731
    batches = EpochPlanBatches(sentences, collate, SEED, BATCH)

    hf_teacher = AutoModel.from_pretrained(teacher_dir, dtype=torch.float32).eval().requires_grad_(False)
    student = hf_student(hf_teacher, layers)
    tb_out = args.work / "peer" / "textbrewer"
    shutil.rmtree(tb_out, ignore_errors=True)
    weight = method_objective("kd", {}, STUDENT_LAYERS, teacher.config.num_hidden_layers).soft  # kd_alpha, 0.5
    distill_config = DistillationConfig(temperature=1, kd_loss_type="mse", kd_loss_weight=weight,
                                        hard_label_weight=0.0)
    train_config = TrainingConfig(device="cpu", output_dir=str(tb_out), log_dir=None, ckpt_steps=args.steps)

    saving = [0.0]

    class Distiller(GeneralDistiller):
        def save_and_callback(self, *a, **k):  # TextBrewer writes gs{N}.pkl at its checkpoint steps
            start = time.perf_counter()
            try:
                return super().save_and_callback(*a, **k)
            finally:
                saving[0] += time.perf_counter() - start

    distiller = Distiller(train_config, distill_config, hf_teacher, student, embedding_adaptor, embedding_adaptor)

    # the same loss: danlu's step and TextBrewer's on the first batch, from the same initial student
    first = next(iter(batches))
    danlu_student = student_from_teacher(teacher, layers).train()
    objective = encoder_objective(method_objective("kd", {}, STUDENT_LAYERS, teacher.config.num_hidden_layers),
                                  "embedding")
    with torch.no_grad():
        danlu_loss = float(encoder_step(danlu_student, first, teacher, objective).loss)
        student.train()
        tb_loss = float(distiller.train_on_batch(first, {})[0])
        init_diff = float((danlu_student(first["input_ids"], attention_mask=first["attention_mask"]) -
                           student(**first).last_hidden_state).abs().max())
    print(f"  same init: danlu's cut student vs the HF copy, last hidden states max |diff| {init_diff:.2e}")
    print(f"  first batch's loss: danlu {danlu_loss:.6e}, TextBrewer {tb_loss:.6e} "
          f"(rel. diff {abs(danlu_loss - tb_loss) / max(abs(danlu_loss), 1e-30):.1e})", flush=True)
    del danlu_student

    # danlu's run of the job, right before TextBrewer's
    with ForeignLoad() as danlu_load:
        danlu_seconds, danlu_loop = run_danlu(job)
    danlu_model = load_pretrained(job.output_dir, dtype="float32", device="cpu").model
    danlu_spearman = evaluate_embedding_student(danlu_model, teacher, tokenizer, held_out)
    print(f"  danlu: {danlu_loop['loop_s']:.1f} s loop, Spearman {danlu_spearman:.4f}", flush=True)

    torch.manual_seed(SEED)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                  fused=True)
    with ForeignLoad() as tb_load:
        start = time.perf_counter()
        with distiller:  # TextBrewer's context: teacher eval, student train
            distiller.train(optimizer, batches, num_steps=args.steps, max_grad_norm=MAX_GRAD_NORM, callback=None)
        tb_loop = time.perf_counter() - start - saving[0]
    final = tb_out / "final"
    student.save_pretrained(final)
    tokenizer.save_pretrained(final)
    tb_model = load_pretrained(final, dtype="float32", device="cpu").model
    tb_spearman = evaluate_embedding_student(tb_model, teacher, tokenizer, held_out)
    print(f"  TextBrewer: {tb_loop:.1f} s loop, Spearman {tb_spearman:.4f}", flush=True)
    return {"textbrewer_version": getattr(textbrewer, "__version__", None), "steps": args.steps, "batch": BATCH,
            "first_batch_loss": {"danlu": danlu_loss, "textbrewer": tb_loss}, "init_max_diff": init_diff,
            "danlu": {"loop_s": danlu_loop["loop_s"], "s_per_step": danlu_loop["loop_s"] / danlu_loop["steps"],
                      "checkpoint_s": danlu_loop["save_s"], "train_s": danlu_seconds, "spearman": danlu_spearman,
                      "foreign_load": round(danlu_load.share, 3)},
            "textbrewer": {"loop_s": tb_loop, "s_per_step": tb_loop / args.steps, "checkpoint_s": saving[0],
                           "spearman": tb_spearman, "foreign_load": round(tb_load.share, 3)},
            "time_ratio": tb_loop / danlu_loop["loop_s"]}


def print_peer(peer: dict) -> None:
    d, t = peer["danlu"], peer["textbrewer"]
    header = ("library", "loop s", "s / step", "held-out Spearman", "checkpoint s (excluded)")
    print_aligned(header, [("danlu", f"{d['loop_s']:.1f}", f"{d['s_per_step']:.3f}", f"{d['spearman']:.4f}",
                            f"{d['checkpoint_s']:.1f}"),
                           (f"TextBrewer {peer['textbrewer_version'] or ''}".strip(), f"{t['loop_s']:.1f}",
                            f"{t['s_per_step']:.3f}", f"{t['spearman']:.4f}", f"{t['checkpoint_s']:.1f}")])
    print(f"TextBrewer time / danlu time: {peer['time_ratio']:.2f}x ({peer['steps']} steps of {peer['batch']} "
          f"sentences); first batch's loss danlu {peer['first_batch_loss']['danlu']:.6e} vs TextBrewer "
          f"{peer['first_batch_loss']['textbrewer']:.6e}; held-out Spearman |danlu - TextBrewer| "
          f"{abs(d['spearman'] - t['spearman']):.1e}")


# ---------------------------------------------------------------- main

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", default="kd,pkd_skip,pkd_last,distilbert,tinybert")
    parser.add_argument("--no-peer", action="store_true", help="skip the TextBrewer comparison")
    parser.add_argument("--work", default="/tmp/danlu-bench-distillation-encoder")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.work = Path(args.work)
    global BATCH
    BATCH = args.batch
    teacher_dir = ensure_bundled_encoder()
    lm = load_pretrained(teacher_dir, dtype="float32", device="cpu")
    lm.model.eval().requires_grad_(False)
    _, held_out = distillation_sentences("data")
    batch = latency_batch(lm.tokenizer, held_out[:LATENCY_BATCH])
    print(f"machine: {machine_info()}")
    print(f"{args.steps} training steps of {BATCH} sentences per student; embedding quality over {len(held_out)} "
          f"held-out sentences; latency: a batch of {LATENCY_BATCH} x {CUTOFF} tokens")
    results = {"machine": machine_info(), "steps": args.steps, "batch": BATCH}

    embedding = run_embedding(args, teacher_dir, lm, held_out, batch)
    classification = run_classification(args, teacher_dir, lm, batch)
    results.update(embedding=embedding, classification=classification)
    peer = None if args.no_peer else run_peer(args, teacher_dir, lm, held_out)

    print()
    print("1. embedding task (quality: Spearman of pairwise cosines vs the teacher's; no labels, so the baseline is "
          "the cut student untrained)")
    print_embedding(embedding)
    baseline = embedding[1]["spearman"]
    for row in embedding[2:]:
        print(f"{row['name']}: Spearman {row['spearman']:.4f} vs {baseline:.4f} untrained "
              f"({row['spearman'] - baseline:+.4f})")
    print()
    print("2. classification task (test split; teacher = its linear probe; retention = accuracy / teacher's)")
    print_classification(classification)
    if len(classification) > 1:
        no_kd = classification[1]
        for row in classification[2:]:
            print(f"{row['name']}: accuracy {row['accuracy']:.4f} vs {no_kd['accuracy']:.4f} without KD "
                  f"({row['accuracy'] - no_kd['accuracy']:+.4f}), macro-F1 {row['macro_f1']:.4f} vs "
                  f"{no_kd['macro_f1']:.4f} ({row['macro_f1'] - no_kd['macro_f1']:+.4f})")
    if peer is not None:
        print()
        print("3. TextBrewer on the embedding job (kd, same teacher, init, batches, optimizer; training loop only)")
        print_peer(peer)
        results["peer"] = peer
    print()
    print(f"for scale: {SEED_FIGURES}")
    shares = {f"embedding: {r['name']}": r["foreign_load"] for r in embedding}
    shares.update({f"classification: {r['name']}": r["foreign_load"] for r in classification})
    if peer is not None:
        shares.update({"peer: danlu": peer["danlu"]["foreign_load"],
                       "peer: textbrewer": peer["textbrewer"]["foreign_load"]})
    print_foreign_load(shares, "measurement")
    save_results(results, args.json)
    return results


if __name__ == "__main__":
    main()
