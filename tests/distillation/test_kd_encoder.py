"""Distillation from an encoder teacher (`--stage kd` with a BERT teacher, kd_task embedding | classification):
the encoder's objective (PKD on [CLS], real x real attention pairs, the embedding MSE), a step that is zero for a
student equal to its teacher, the linear probe, the classifier's files, the data each task reads, and `train`
end to end on tiny BERT directories. Under `real`: all-MiniLM-L6-v2 into a 3-layer student, both tasks."""
import collections
import copy
import json
import re
import time

import pytest
import torch
import torch.nn.functional as F

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import load_pretrained
from danlu.distillation import losses
from danlu.distillation.encoder_tasks import (CLASSIFIER, CLASSIFIER_CONFIG, CLASSIFIER_FILE, SentenceClassifier,
                                              evaluate_classifier, evaluate_embedding_student, load_classifier,
                                              save_classifier, train_linear_probe)
from danlu.distillation.objective import (Objective, Outputs, distillation_loss, encoder_pairs, method_objective,
                                          run_model)
from danlu.distillation.students import student_from_teacher
from danlu.evaluation.classification import read_labelled
from danlu.evaluation.embeddings import distillation_sentences
from danlu.models.pooling import sentence_embeddings
from danlu.models.presets import get_preset
from danlu.models.transformer import Intermediates, Transformer
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.recipes.kd_encoder import (Sentence, classification_data, collate_sentences, embedding_data,
                                               encoder_objective, encoder_step)
from danlu.training.train import train
from tests.conftest import byte_tokenizer, make_hf_model, save_hf_model
from tests.models.test_encoder import make_hf_bert

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOPICS = ["food", "science", "sports", "technology"]


def data_tokenizer(size=256):
    """A WordPiece tokenizer of the shipped data's most frequent words (whole words, lower-cased): tiny, but the
    sentences are mostly words rather than [UNK]."""
    from transformers import BertTokenizer

    counts = collections.Counter()
    for name in ("danlu_text", "danlu_topics"):
        for line in open(f"data/{name}.jsonl", encoding="utf-8"):
            counts.update(re.findall(r"[a-z]+|[^\sa-z]", json.loads(line)["text"].lower()))
    words = [w for w, _ in counts.most_common(size - len(SPECIALS))]
    return BertTokenizer(vocab={w: i for i, w in enumerate(SPECIALS + words)})


@pytest.fixture(scope="module")
def tokenizer():
    return data_tokenizer()


def tiny_bert(layers=2, hidden=64, seed=0):
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny-bert").replace(num_hidden_layers=layers, hidden_size=hidden,
                                                         intermediate_size=2 * hidden))
    model.init_weights()
    return model.eval().requires_grad_(False)


SENTENCES = ["The cat sat on the mat.", "Bread needs flour, water and salt.",
             "The match ended in a draw after extra time.", "A new phone has a faster chip.",
             "Stars are made mostly of hydrogen.", "Rice is cooked in water."]


def sentence_batch(tokenizer, labels=False, max_length=32):
    rows = [Sentence(text, i % 4 if labels else -1) for i, text in enumerate(SENTENCES)]
    return collate_sentences(rows, tokenizer, max_length)


# ------------------------------------------------------------------ the encoder's objective

def test_encoder_attention_pairs_are_real_query_by_real_key_and_the_loss_is_textbrewers():
    from textbrewer.losses import att_mse_loss

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    pairs = encoder_pairs(mask)
    assert pairs.shape == (2, 1, 4, 4)
    assert pairs[0, 0].tolist() == [[True, True, True, False]] * 3 + [[False] * 4]  # no causal mask
    assert pairs[1, 0, :2, :2].all() and not pairs[1, 0, 2:].any() and not pairs[1, 0, :, 2:].any()
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(losses.attention_mse(s, t, pairs), att_mse_loss(s, t, mask))


def test_patient_kd_on_an_encoder_compares_the_cls_vectors_as_textbrewers_pkd_loss(tokenizer):
    from textbrewer.losses import pkd_loss

    teacher = tiny_bert(layers=4)
    student = student_from_teacher(teacher, [0, 2])
    batch = sentence_batch(tokenizer)
    for method in ("pkd_skip", "pkd_last"):
        objective = encoder_objective(method_objective(method, {"kd_alpha": 0.0}, 2, 4), "classification")
        assert objective.pkd_position == 0 and objective.layer_map
        s, t = run_model(student, batch, objective), run_model(teacher, batch, objective)
        _, metrics = distillation_loss(objective, s, t, torch.tensor(0.0), None, batch["attention_mask"], None)
        expected = sum(pkd_loss(s.seen.hidden_states[i], t.seen.hidden_states[j]) for i, j in objective.layer_map)
        assert metrics["kd_hidden"] == pytest.approx(float(expected.detach()), rel=1e-5)
        # a decoder's Patient-KD (every counted token) is another number
        _, every_token = distillation_loss(method_objective(method, {"kd_alpha": 0.0}, 2, 4), s, t,
                                           torch.tensor(0.0), None, batch["attention_mask"], None)
        assert abs(every_token["kd_hidden"] - metrics["kd_hidden"]) > 1e-4


def test_the_embedding_soft_term_is_the_mse_of_the_sentence_embeddings_without_temperature():
    objective = encoder_objective(method_objective("kd", {"kd_alpha": 0.5}, 2, 2, temperature=3.0), "embedding")
    assert (objective.soft, objective.hard, objective.soft_loss, objective.temperature) == (0.5, 0.0, "mse", 1.0)
    torch.manual_seed(0)
    s, t = F.normalize(torch.randn(5, 16), dim=-1), F.normalize(torch.randn(5, 16), dim=-1)
    empty = Intermediates()
    loss, metrics = distillation_loss(objective, Outputs(s, empty), Outputs(t, empty), torch.tensor(7.0), None,
                                      torch.ones(5, 3), None)
    mse = torch.nn.MSELoss()(s, t)  # sentence-transformers' losses.MSELoss
    assert metrics["kd_soft"] == pytest.approx(float(mse))
    assert float(loss) == pytest.approx(0.5 * float(mse))  # no T^2, no hard term
    # even if the objective keeps a temperature, an MSE soft term is never scaled by T^2
    hot = Objective(soft=1.0, soft_loss="mse", temperature=4.0)
    assert float(distillation_loss(hot, Outputs(s, empty), Outputs(t, empty), None, None, None, None)[0]) == \
        pytest.approx(float(mse))


@pytest.mark.parametrize("task", ["embedding", "classification"])
@pytest.mark.parametrize("method", ["kd", "pkd_skip", "pkd_last", "distilbert", "tinybert"])
def test_a_student_equal_to_its_teacher_has_nothing_to_learn(tokenizer, method, task):
    teacher = tiny_bert()
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    weights = {"kd_alpha": 1.0} if method in ("kd", "pkd_skip", "pkd_last") else {}
    objective = encoder_objective(method_objective(method, weights, 2, 2, divergence="forward_kl"), task)
    head = None
    if task == "classification":
        torch.manual_seed(1)
        head = SentenceClassifier(64, TOPICS).requires_grad_(False)
        setattr(student, CLASSIFIER, copy.deepcopy(head).requires_grad_(True))
    batch = sentence_batch(tokenizer, labels=task == "classification")
    out = encoder_step(student, batch, teacher, objective, head)
    terms = {k: v for k, v in out.metrics.items() if k.startswith("kd_")}
    assert "kd_soft" in terms and (method in ("kd", "distilbert") or "kd_hidden" in terms)
    for name, value in terms.items():
        assert abs(value) < 1e-5, (name, value)
    expected = 2.0 * out.metrics["ce_loss"] if (method, task) == ("distilbert", "classification") else 0.0
    assert float(out.loss.detach()) == pytest.approx(expected, abs=1e-5)
    assert out.weight == len(SENTENCES) and out.n_tokens == int(batch["attention_mask"].sum())
    out.loss.backward()  # the loss reaches the student (and its head)


def test_a_narrower_students_embedding_is_compared_through_a_projection(tokenizer):
    from danlu.distillation.objective import PROJECTIONS
    from danlu.training.recipes.kd_encoder import SENTENCE, encoder_projections

    teacher, student = tiny_bert(), tiny_bert(hidden=32, seed=1).train().requires_grad_(True)
    objective = encoder_objective(method_objective("kd", {}, 2, 2), "embedding")
    projections = encoder_projections(objective, "embedding", 32, 64)
    assert set(projections) == {SENTENCE}
    setattr(student, PROJECTIONS, projections)
    out = encoder_step(student, sentence_batch(tokenizer), teacher, objective)
    out.loss.backward()
    assert projections[SENTENCE].weight.grad.abs().sum() > 0
    assert encoder_projections(objective, "embedding", 64, 64) is None
    assert encoder_projections(encoder_objective(method_objective("kd", {}, 2, 2), "classification"),
                               "classification", 32, 64) is None  # a fresh head is the student's own width


# ------------------------------------------------------------------ the linear probe and the head's files

def test_the_linear_probe_learns_a_separable_task_deterministically():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(3, 24), dim=-1) * 3
    targets = torch.arange(3).repeat_interleave(40)
    x = F.normalize(centres[targets] + 0.3 * torch.randn(120, 24), dim=-1)
    probe = train_linear_probe(x, targets, ["a", "b", "c"])
    assert (probe(x).argmax(-1) == targets).all()
    again = train_linear_probe(x, targets, ["a", "b", "c"])
    assert torch.equal(probe.weight, again.weight) and torch.equal(probe.bias, again.bias)
    assert not probe.weight.requires_grad and probe.labels == ["a", "b", "c"]


def test_the_linear_probe_is_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(1)
    x = F.normalize(torch.randn(90, 16), dim=-1)
    targets = (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()  # three overlapping classes
    probe = train_linear_probe(x, targets, ["x", "y", "z"], c=2.0)
    reference = LogisticRegression(C=2.0, max_iter=10000, tol=1e-10).fit(x.numpy(), targets.numpy())
    ours = torch.softmax(probe(x), -1).detach().numpy()
    assert abs(ours - reference.predict_proba(x.numpy())).max() < 1e-3


def test_the_classifier_files_round_trip_and_bad_ones_are_named(tmp_path):
    torch.manual_seed(0)
    head = SentenceClassifier(8, TOPICS)
    save_classifier(head, tmp_path)
    assert json.loads((tmp_path / CLASSIFIER_CONFIG).read_text())["labels"] == TOPICS
    loaded = load_classifier(tmp_path)
    assert loaded.labels == TOPICS and loaded.in_features == 8
    torch.testing.assert_close(loaded.weight, head.weight.detach())
    torch.testing.assert_close(loaded.bias, head.bias.detach())
    with pytest.raises(CheckpointError, match="no classifier head"):
        load_classifier(tmp_path / "nowhere")
    (tmp_path / CLASSIFIER_CONFIG).write_text(json.dumps({"labels": TOPICS[:3]}))
    with pytest.raises(CheckpointError, match="expected weight \\[3, hidden\\]"):
        load_classifier(tmp_path)
    with pytest.raises(ValueError, match="two or more distinct labels"):
        SentenceClassifier(8, ["a", "a"])


def test_the_measures_of_a_student(tokenizer):
    teacher = tiny_bert()
    assert evaluate_embedding_student(teacher, teacher, tokenizer, SENTENCES) == pytest.approx(1.0)
    other = evaluate_embedding_student(tiny_bert(hidden=32, seed=3), teacher, tokenizer, SENTENCES)
    assert -1.0 <= other < 0.99
    vectors = sentence_embeddings(teacher, tokenizer, SENTENCES)
    labels = ["a", "b", "a", "b", "a", "b"]
    probe = train_linear_probe(vectors, torch.tensor([0, 1, 0, 1, 0, 1]), ["a", "b"], c=100.0)
    assert evaluate_classifier(teacher, probe, tokenizer, SENTENCES, labels) == {"accuracy": 1.0, "macro_f1": 1.0}
    with pytest.raises(ValueError, match="not among the head's"):
        evaluate_classifier(teacher, probe, tokenizer, SENTENCES, ["c"] * 6)


# ------------------------------------------------------------------ data

def task_args(**overrides):
    values = dict(stage="kd", student_layers=1, finetuning_type="full", dataset_dir="data", seed=3)
    values.update(overrides)
    return TrainArguments(**values)


def test_the_embedding_task_trains_on_the_sentences_of_the_dataset_never_the_held_out_ones():
    train_set, held_out = embedding_data(task_args(dataset="danlu_text,danlu_topics"))
    expected_train, expected_held_out = distillation_sentences("data")
    assert sorted(s.text for s in train_set) == sorted(expected_train) and held_out == []  # shuffled by the seed
    assert not set(expected_held_out) & {s.text for s in train_set}
    train_set, held_out = embedding_data(task_args(dataset="danlu_text", val_size=0.1))
    assert len(held_out) == round(0.1 * (len(train_set) + len(held_out)))
    _, test = embedding_data(task_args(dataset="danlu_text", eval_dataset="danlu_topics"))
    assert {s.text for s in test} == set(read_labelled("data/danlu_topics.jsonl", "test")[0])


def test_the_classification_task_trains_on_the_train_split_and_keeps_the_test_split():
    train_set, held_out, labels, test = classification_data(task_args(dataset="danlu_topics", kd_task="classification"))
    texts, names, label_names = read_labelled("data/danlu_topics.jsonl", "train")
    assert labels == label_names == TOPICS and held_out == []
    assert sorted((s.text, labels[s.label]) for s in train_set) == sorted(zip(texts, names))  # shuffled
    test_texts, test_names, _ = read_labelled("data/danlu_topics.jsonl", "test")
    assert [(s.text, labels[s.label]) for s in test] == list(zip(test_texts, test_names))
    with pytest.raises(Exception, match="needs a label in every record"):
        classification_data(task_args(dataset="danlu_text", kd_task="classification"))


def test_a_batch_is_padded_on_the_right_and_cut_at_max_length(tokenizer):
    batch = collate_sentences([Sentence("the cat sat on the mat and the dog ran in the park", 2), Sentence("a", 0)],
                              tokenizer, max_length=6)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [2, 0]
    assert "labels" not in collate_sentences([Sentence("a")], tokenizer, 6)


# ------------------------------------------------------------------ train(--stage kd) end to end

@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    """A tiny random BertModel teacher (3 layers, width 64) and a narrower one (width 32) as a student."""
    tokenizer = data_tokenizer()
    teacher = tmp_path_factory.mktemp("teacher")
    make_hf_bert().save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    narrow = tmp_path_factory.mktemp("narrow")
    make_hf_bert(hidden_size=32, intermediate_size=64, num_hidden_layers=2).save_pretrained(narrow)
    tokenizer.save_pretrained(narrow)
    return teacher, narrow


def kd_args(model_dir, out, **overrides):
    values = dict(model_name_or_path=str(model_dir), stage="kd", dataset="danlu_text,danlu_topics", dataset_dir="data",
                  finetuning_type="full", learning_rate=1e-3, max_steps=3, per_device_train_batch_size=8,
                  logging_steps=1, save_steps=2, cutoff_len=48, output_dir=str(out), seed=7)
    values.update(overrides)
    return TrainArguments(**values)


def hidden_states_agree(out):
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    lm = load_pretrained(out, dtype="float32")
    batch = collate_sentences([Sentence(s) for s in SENTENCES], lm.tokenizer, 32)
    with torch.no_grad():
        ours = lm.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        theirs = hf(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    return lm


def weight_names(out):
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        return list(f.keys())


def log_rows(out):
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["kd", "pkd_skip", "tinybert"])
def test_an_embedding_student_trains_and_transformers_loads_it(bert_dirs, tmp_path, method):
    teacher, _ = bert_dirs
    out = tmp_path / method
    result = train(kd_args(teacher, out, student_layers=2, kd_method=method, eval_strategy="steps", eval_steps=3,
                           val_size=0.05))
    assert result.state.global_step == 3
    rows = log_rows(out)
    assert any("kd_soft" in r for r in rows) and any("eval_loss" in r for r in rows)
    lm = hidden_states_agree(out)
    assert lm.config.num_hidden_layers == 2 and not lm.config.causal
    assert not (out / CLASSIFIER_FILE).exists()
    assert not any("distill" in n or CLASSIFIER in n for n in weight_names(out))


def test_a_classification_student_saves_its_head_beside_the_encoder(bert_dirs, tmp_path):
    from safetensors.torch import load_file

    teacher, _ = bert_dirs
    out = tmp_path / "run"
    train(kd_args(teacher, out, student_layers=2, kd_task="classification", dataset="danlu_topics", max_steps=4,
                  kd_method="distilbert"))
    rows = log_rows(out)
    assert any("accuracy" in r and "ce_loss" in r for r in rows)
    lm = hidden_states_agree(out)
    head = load_classifier(out)
    assert head.labels == TOPICS and head.weight.shape == (4, 64)
    assert not any(CLASSIFIER in n for n in weight_names(out))
    # the saved head is the trained one: the last checkpoint holds the same tensors
    checkpoint = load_file(str(out / "checkpoint-4" / "trainable.safetensors"))
    torch.testing.assert_close(head.weight, checkpoint[f"{CLASSIFIER}.weight"])
    texts, labels, _ = read_labelled("data/danlu_topics.jsonl", "test")
    scores = evaluate_classifier(lm.model, head, lm.tokenizer, texts[:20], labels[:20], max_length=48)
    assert 0.0 <= scores["accuracy"] <= 1.0


def test_a_narrower_student_learns_through_projections_and_gets_a_fresh_head(bert_dirs, tmp_path):
    from safetensors import safe_open

    teacher, narrow = bert_dirs
    out = tmp_path / "embedding"
    train(kd_args(narrow, out, teacher_model=str(teacher), kd_method="tinybert", layer_map="1:1,2:3"))
    checkpoint = next(out.glob("checkpoint-*"))
    names = list(safe_open(checkpoint / "trainable.safetensors", "pt").keys())
    assert any("distill_projections.sentence" in n for n in names)
    assert any("distill_projections.hidden" in n for n in names)
    assert not any("distill" in n for n in weight_names(out))
    hidden_states_agree(out)
    out = tmp_path / "classification"
    train(kd_args(narrow, out, teacher_model=str(teacher), kd_task="classification", dataset="danlu_topics"))
    assert load_classifier(out).weight.shape == (4, 32)


def test_what_an_encoder_run_refuses(bert_dirs, tmp_path):
    teacher, narrow = bert_dirs
    with pytest.raises(ArgumentError, match="kd_task must be one of embedding, classification"):
        kd_args(teacher, tmp_path / "a", student_layers=2, kd_task="regression")
    with pytest.raises(ArgumentError, match="an encoder student trains with finetuning_type full"):
        train(kd_args(narrow, tmp_path / "b", teacher_model=str(teacher), finetuning_type="lora"))
    with pytest.raises(ArgumentError, match="kd_temperature and kd_divergence apply to class logits"):
        train(kd_args(teacher, tmp_path / "c", student_layers=2, kd_temperature=2.0))
    with pytest.raises(ArgumentError, match="dynabert trains on kd_stage's language-modelling data"):
        train(kd_args(teacher, tmp_path / "d", kd_method="dynabert"))
    with pytest.raises(ArgumentError, match="kd_lmbda 0.5: on-policy answers are a decoder's"):
        train(kd_args(teacher, tmp_path / "h", student_layers=2, kd_lmbda=0.5))
    with pytest.raises(ArgumentError, match="cosine loss compares hidden states of one width"):
        train(kd_args(narrow, tmp_path / "e", teacher_model=str(teacher), kd_method="distilbert"))
    tokenizer = byte_tokenizer()
    decoder = save_hf_model(make_hf_model("llama", vocab_size=256), tmp_path / "decoder", tokenizer)
    with pytest.raises(ArgumentError, match="the teacher is an encoder and the student a decoder"):
        train(kd_args(decoder, tmp_path / "f", teacher_model=str(teacher), dataset="identity"))
    with pytest.raises(ArgumentError, match="kd_task classification is for an encoder teacher"):
        train(kd_args(decoder, tmp_path / "g", student_layers=1, kd_task="classification", dataset="identity"))


# ------------------------------------------------------------------ the real all-MiniLM-L6-v2

@pytest.fixture(scope="module")
def minilm():
    from danlu.checkpoints.bundled import ensure_bundled_encoder

    directory = ensure_bundled_encoder()
    return directory, load_pretrained(directory, dtype="float32", device="cpu")


def real_args(teacher_dir, out, **overrides):
    values = dict(model_name_or_path=str(teacher_dir), stage="kd", student_layers=3, finetuning_type="full",
                  dataset_dir="data", learning_rate=1e-4, lr_scheduler_type="constant", max_steps=40,
                  per_device_train_batch_size=16, cutoff_len=128, logging_steps=10, save_steps=10 ** 6,
                  output_dir=str(out), seed=42)
    values.update(overrides)
    return TrainArguments(**values)


@pytest.mark.real
def test_minilm_into_three_layers_raises_the_held_out_spearman(minilm, tmp_path):
    teacher_dir, teacher = minilm
    _, held_out = distillation_sentences("data")  # 220 sentences, none trained on
    cut = student_from_teacher(teacher.model, [0, 2, 4])
    before = evaluate_embedding_student(cut, teacher.model, teacher.tokenizer, held_out)
    start = time.perf_counter()
    train(real_args(teacher_dir, tmp_path, dataset="danlu_text,danlu_topics"))
    seconds = time.perf_counter() - start
    student = load_pretrained(tmp_path, dtype="float32", device="cpu")
    after = evaluate_embedding_student(student.model, teacher.model, teacher.tokenizer, held_out)
    print(f"\nembedding: Spearman {before:.4f} -> {after:.4f} over {len(held_out)} held-out sentences, "
          f"40 steps x 16 in {seconds:.0f} s")
    assert student.config.num_hidden_layers == 3
    assert after > before + 0.05


@pytest.mark.real
def test_minilm_into_three_layers_keeps_the_topic_classifier(minilm, tmp_path):
    teacher_dir, teacher = minilm
    texts, labels, names = read_labelled("data/danlu_topics.jsonl", "train")
    test_texts, test_labels, _ = read_labelled("data/danlu_topics.jsonl", "test")
    vectors = sentence_embeddings(teacher.model, teacher.tokenizer, texts)
    probe = train_linear_probe(vectors, torch.tensor([names.index(label) for label in labels]), names)
    teacher_scores = evaluate_classifier(teacher.model, probe, teacher.tokenizer, test_texts, test_labels)
    cut = student_from_teacher(teacher.model, [0, 2, 4])
    before = evaluate_classifier(cut, probe, teacher.tokenizer, test_texts, test_labels)
    start = time.perf_counter()
    train(real_args(teacher_dir, tmp_path, dataset="danlu_topics", kd_task="classification"))
    seconds = time.perf_counter() - start
    student = load_pretrained(tmp_path, dtype="float32", device="cpu")
    after = evaluate_classifier(student.model, load_classifier(tmp_path), student.tokenizer, test_texts, test_labels)
    print(f"\nclassification (test split, {len(test_texts)}): teacher probe {teacher_scores}; student with the "
          f"teacher's probe before training {before}; after 40 steps x 16 ({seconds:.0f} s) {after}")
    assert teacher_scores["accuracy"] >= 0.9
    assert after["accuracy"] >= 0.75  # chance is 0.25
    logged = [row for row in log_rows(tmp_path) if "ce_loss" in row]
    assert logged[-1]["ce_loss"] < logged[0]["ce_loss"]  # the student and its head did learn
