"""Context distillation (``softprompt/cartridges/``): the teacher against the base model with the document in front,
the top-k loss (zero for the teacher's own cache, positive otherwise, its gradient only on the cartridge's trainable
positions, equal to the loss computed from full logits), and the recipe in a training run: its files, a run
repeated from them, bit-exact resume without generating again, and its settings' checks.

Shapes: D document tokens, P cartridge positions, N positions, k kept tokens, V vocab.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import softprompt.training.context_distillation as recipe
from softprompt import CartridgeConfig, SoftPromptModel
from softprompt.cartridges import ChatFormat, TopKTargets, document_cache, rows_of_head, teacher_targets, topk_kl
from softprompt.cartridges.distillation import summed_distillation_loss
from softprompt.cartridges.evaluation import QuestionAnswer, evaluate_cartridge, read_questions
from softprompt.cartridges.self_study import document_chunks
from softprompt.cli import main
from softprompt.methods.cartridge import table_from_text
from softprompt.quickstart import build_tiny_model
from softprompt.training import ConfigError, TrainConfig, TrainingInterrupted, load_base_model, train

DOCUMENT = ("Tweet text : my flight was cancelled again and the crew was lovely and kind today . "
            "thanks for the coffee , the dinner was late but the pilot was great .")
CONVERSATIONS = [
    ("what was cancelled ?", "my flight was cancelled again ."),
    ("how was the crew ?", "the crew was lovely and kind today ."),
    ("was the dinner late ?", "yes , the dinner was late ."),
]
TOP_K = 5


@pytest.fixture
def setup(tokenizer):
    """A tiny grouped-query Llama, the plain-text layout, the conversations' ids and the teacher's targets."""
    base = build_tiny_model("llama", len(tokenizer), seed=0)
    chat = ChatFormat(tokenizer)
    context_ids = chat.context_ids(DOCUMENT)
    conversation_ids = [chat.conversation_ids(question, answer) for question, answer in CONVERSATIONS]
    teacher = SoftPromptModel.from_module(base, *document_cache(base, context_ids), adapter_name="document")
    targets = teacher_targets(teacher, conversation_ids, TOP_K, batch_size=2)
    return base, chat, context_ids, conversation_ids, targets


def left_padded(conversation_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in conversation_ids)
    input_ids = torch.zeros(len(conversation_ids), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(conversation_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    return input_ids, mask


def test_the_teacher_is_the_base_model_with_the_document_in_front(setup):
    """Its top-k at each conversation position are the base model's, run on the document's ids followed by the
    conversation's (no cache reused, no adapter); position t of a conversation predicts its token t + 1."""
    base, _, context_ids, conversation_ids, targets = setup
    assert targets.offsets.tolist() == [0, *torch.tensor([len(ids) for ids in conversation_ids]).cumsum(0).tolist()]
    for r, ids in enumerate(conversation_ids):
        with torch.no_grad():
            logits = base(torch.tensor([context_ids + ids])).logits[0, len(context_ids):]  # [n, V]
        top = torch.log_softmax(logits, dim=-1).topk(TOP_K, dim=-1)
        our_ids, our_logprobs = targets.of([r])
        assert torch.equal(our_ids, top.indices)
        torch.testing.assert_close(our_logprobs, top.values, rtol=1e-5, atol=1e-5)


def test_the_loss_is_zero_with_the_teachers_own_document_cache_and_positive_otherwise(setup, tokenizer):
    base, _, context_ids, conversation_ids, targets = setup
    input_ids, mask = left_padded(conversation_ids)
    rows = list(range(len(conversation_ids)))

    def loss_per_position(config: CartridgeConfig) -> float:
        student = SoftPromptModel(base, config, tokenizer=tokenizer)
        with torch.no_grad():
            total, counts = summed_distillation_loss(student, input_ids, mask, ["default"] * len(rows), targets, rows)
        assert counts.tolist() == [len(ids) for ids in conversation_ids]
        return float(total / counts.sum())

    # A cartridge of every document position, from the document's prefill: the teacher's context itself.
    whole = loss_per_position(CartridgeConfig(num_virtual_tokens=len(context_ids), init_text=DOCUMENT))
    assert abs(whole) < 1e-6, whole  # 0 up to rounding (the k head rows against the teacher's full product)
    assert loss_per_position(CartridgeConfig(num_virtual_tokens=4, init_text=DOCUMENT)) > 1e-3
    torch.manual_seed(0)
    assert loss_per_position(CartridgeConfig(num_virtual_tokens=4)) > 1e-3


def test_the_gradient_reaches_only_the_trainable_positions_and_equals_the_full_logits_loss(setup, tokenizer):
    """The k head rows (`rows_of_head`, its own backward pass) give the loss and gradients of full logits."""
    base, _, _, conversation_ids, targets = setup
    student = SoftPromptModel(base, CartridgeConfig(num_virtual_tokens=6, num_frozen_tokens=2, init_text=DOCUMENT),
                              tokenizer=tokenizer)
    module = student.prompts["default"]
    input_ids, mask = left_padded(conversation_ids)
    rows = list(range(len(conversation_ids)))
    total, _ = summed_distillation_loss(student, input_ids, mask, ["default"] * 3, targets, rows)
    total.backward()
    assert module.frozen_embedding.grad is None
    ours = module.trainable_embedding.grad.clone()
    assert bool((ours.abs().sum(dim=1) > 0).all())  # every trainable position moves

    module.zero_grad()
    logits = student(input_ids, mask).logits[mask.bool()]  # [N, V] the full head, PEFT's layout
    ids, logprobs = targets.of(rows)
    reference = topk_kl(torch.gather(logits, 1, ids), logprobs).sum()
    reference.backward()
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, module.trainable_embedding.grad, rtol=1e-5, atol=1e-6)

    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    head, picks = torch.randn(11, 5, dtype=torch.float64), torch.randint(11, (7, 3))
    assert torch.autograd.gradcheck(lambda h: rows_of_head(h, head, picks, softcap=2.0, block=3), (hidden,))


def test_targets_round_trip_through_safetensors(setup, tmp_path):
    targets = setup[-1]
    targets.save(tmp_path / "teacher.safetensors")
    loaded = TopKTargets.load(tmp_path / "teacher.safetensors")
    for name in ("ids", "logprobs", "offsets"):
        assert torch.equal(getattr(loaded, name), getattr(targets, name)), name


# ------------------------------------------------------------------------------------------------ the recipe


def recipe_config(tmp_path: Path, **overrides) -> TrainConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(DOCUMENT * 2)
    values = dict(method="cartridge", recipe="context-distillation", corpus=str(corpus), num_virtual_tokens=4,
                  num_conversations=10, max_answer_tokens=12, chunk_tokens=24, max_length=48, top_k=TOP_K,
                  num_epochs=2, batch_size=4, num_generations=0, progress=False, save_every=1,
                  output_dir=str(tmp_path / "run"))
    values.update(overrides)
    return TrainConfig.from_dict(values)


def test_the_recipe_trains_a_cartridge_and_records_its_data(tmp_path, tokenizer):
    result = train(recipe_config(tmp_path, num_epochs=3))
    run = tmp_path / "run"
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["conversations"] == 10 and manifest["record"]["top_k"] == TOP_K
    lines = (run / "data" / "conversations.jsonl").read_text().splitlines()
    chunks = len(document_chunks(tokenizer, DOCUMENT * 2, 24))  # the embedded model's tokenizer is the fixture's
    assert chunks > 1 and len(lines) == 10
    assert {json.loads(line)["chunk"] for line in lines} == set(range(min(chunks, 10)))
    assert result.final_eval["loss"] < result.initial_eval["loss"]
    model = SoftPromptModel.from_pretrained(load_base_model(result.base_model, torch.float32)[0], run / "adapter")
    # The cartridge started as the corpus's first 4 positions in context; its frozen sink still is the first.
    start = table_from_text(model.base_model, tokenizer, DOCUMENT * 2, 4)
    torch.testing.assert_close(model.prompts["default"].frozen_embedding, start[:1], rtol=0, atol=1e-6)
    assert not torch.allclose(model.prompts["default"].trainable_embedding, start[1:])

    # Repeated from the recorded conversations: nothing generated, the same teacher targets.
    again = recipe_config(tmp_path, queries=str(run / "data" / "conversations.jsonl"),
                          output_dir=str(tmp_path / "again"), num_epochs=1)
    train(again)
    first = load_file(run / "data" / "teacher.safetensors")
    second = load_file(tmp_path / "again" / "data" / "teacher.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_resume_is_bit_exact_and_does_not_generate_again(tmp_path, monkeypatch):
    uninterrupted = train(recipe_config(tmp_path, output_dir=str(tmp_path / "uninterrupted")))
    steps = iter(range(100))
    with pytest.raises(TrainingInterrupted):
        train(recipe_config(tmp_path), stop_requested=lambda: next(steps) == 3)  # stopped before its 4th step

    def fail(*args, **kwargs):
        raise AssertionError("a resumed run must read its data back, not make it again")

    monkeypatch.setattr(recipe, "self_study", fail)
    monkeypatch.setattr(recipe, "teacher_targets", fail)
    resumed = train(recipe_config(tmp_path, resume=True))
    assert resumed.resumed_from is not None and resumed.global_step == uninterrupted.global_step
    ours = load_file(tmp_path / "run" / "adapter" / "adapter.safetensors")
    theirs = load_file(tmp_path / "uninterrupted" / "adapter" / "adapter.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name].view(torch.uint8), theirs[name].view(torch.uint8)), name


def test_the_command_line_runs_the_recipe_with_questions_from_a_file(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(DOCUMENT)
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(question for question, _ in CONVERSATIONS * 2) + "\n")
    arguments = ["train", "--method", "prefix-tuning", "--recipe", "context-distillation", "--corpus", str(corpus),
                 "--queries", str(questions), "--num-virtual-tokens", "3", "--max-answer-tokens", "8",
                 "--num-epochs", "1", "--max-length", "32", "--no-progress", "--num-generations", "0",
                 "--output-dir", str(tmp_path / "run")]
    assert main(arguments) == 0
    assert "context_distillation recipe, 5 training / 1 held-out examples" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "data" / "conversations.jsonl").read_text().splitlines()]
    assert [row["question"] for row in rows] == [question for question, _ in CONVERSATIONS * 2]
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]

    # `softprompt eval` on the adapter: the held-out distillation loss again, from the run's stored data.
    monkeypatch.setattr(recipe, "teacher_targets", lambda *args, **kwargs: pytest.fail("made the data again"))
    monkeypatch.chdir(tmp_path / "run")  # the run's data is found from the adapter, wherever eval runs
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(final["loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"recipe": "context-distillation", "method": "prompt-tuning", "corpus": "c.txt"},
         r"expected a key/value cache .*Fix: --method cartridge"),
        ({"recipe": "context-distillation", "method": "prefix-tuning", "prefix_projection": True, "corpus": "c.txt"},
         r"expected a key/value cache"),
        ({"recipe": "context-distillation", "method": "cartridge"}, r"corpus=None .*Fix: --corpus FILE"),
        ({"method": "cartridge", "corpus": "c.txt"}, r"corpus='c.txt' with recipe='auto'.*--recipe context-distillation"),
        ({"recipe": "context-distillation", "method": "cartridge", "corpus": "c.txt", "init_text": "hello"},
         r"init_text with init_from_corpus=True"),
        ({"recipe": "context-distillation", "method": "cartridge", "corpus": "c.txt", "top_k": 0},
         r"top_k=0"),
    ],
)
def test_recipe_settings_are_checked_with_the_fix(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(values)


def test_a_missing_corpus_is_refused_before_anything_is_written(tmp_path):
    config = recipe_config(tmp_path, corpus=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"missing.txt'?: cannot read it as UTF-8 text"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_the_evaluation_compares_the_cartridge_with_the_document_and_with_nothing(setup, tokenizer):
    """A cartridge of every document position is the document in context: the same answer likelihoods and greedy
    answers, the whole gap closed, the same memory."""
    base, _, context_ids, _, _ = setup
    model = SoftPromptModel(base, CartridgeConfig(num_virtual_tokens=len(context_ids), init_text=DOCUMENT),
                            tokenizer=tokenizer)
    questions = [QuestionAnswer(question, answer) for question, answer in CONVERSATIONS]
    report = evaluate_cartridge(model, tokenizer, DOCUMENT, questions, max_new_tokens=4, speed_tokens=2, repeats=1)
    per_token = report["log_likelihood_per_token"]
    torch.testing.assert_close(per_token["cartridge"], per_token["document"], rtol=0, atol=1e-5)
    assert per_token["none"] != per_token["document"] and report["gap_closed"] == pytest.approx(1, abs=1e-3)
    assert [row["greedy"]["cartridge"] for row in report["per_question"]] == \
        [row["greedy"]["document"] for row in report["per_question"]]
    assert report["memory"]["fraction"] == 1 and report["memory"]["cartridge_bytes"] == \
        len(context_ids) * model.shape.prefix_width * 4
    assert set(report["speed"]["seconds"]) == {"cartridge", "document cache (prefilled once)", "document in the prompt"}


def test_the_shipped_document_and_questions_are_readable():
    data = resources.files("softprompt") / "data"
    questions = read_questions(Path(str(data / "cartridge_questions.jsonl")))
    document = recipe.read_corpus(str(data / "cartridge_document.md"))
    assert len(questions) == 12 and "Checkpoints and resume" in document
    assert "cartridge_document.md" in (data / "ATTRIBUTION.md").read_text()
