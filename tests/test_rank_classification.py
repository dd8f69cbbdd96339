"""Rank classification (softprompt/training/rank_classification.py) against a brute-force reference: every prompt
and candidate label run alone through the full-logits forward, the label's log-probabilities summed by hand.

Also the per-row loss it rests on (``compute_loss(..., reduction="per_row")``) against each row alone, in both
virtual-token layouts, and the label sets evaluation ranks among.
"""

from __future__ import annotations

import copy

import pytest
import torch

from softprompt import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, SoftPromptModel
from softprompt.recipes import classification_eval_examples, label_accuracy, label_choices
from softprompt.training.rank_classification import label_log_likelihoods, rank_labels

from helpers import left_padded_batch

ROWS = {
    # Labels of different token counts, one the start of another ("no" / "no complaint"): EOS tells them apart.
    "complaints": [("my bag is lost again", "complaint"), ("the crew was lovely", "no complaint"),
                   ("no", "no"), ("lost bag", "complaint")],
    "spam": [("win a prize now", "spam"), ("see you at home", "ham"), ("free entry", "spam")],
}
ADAPTERS = {"complaints": PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16),
            "spam": PrefixTuningConfig(num_virtual_tokens=2)}
# fp32 on CPU: the batch pads the rows and takes the label-only head; the reference runs each row alone with the
# full logits and a float64 log-softmax. Only summation order differs (a few ulps of sums of order 10); a wrong
# token, position or adapter moves a score by 1e-2 or more.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def two_task_model(tiny_bloom, tokenizer):
    torch.manual_seed(0)
    names = list(ADAPTERS)
    model = SoftPromptModel(tiny_bloom, copy.deepcopy(ADAPTERS[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, copy.deepcopy(ADAPTERS[name]))
    return model.eval()


@pytest.fixture
def prompts(tokenizer):
    examples = []
    for task, rows in ROWS.items():
        examples += classification_eval_examples([{"text": text, "label": label, "task": task} for text, label in rows],
                                                 tokenizer, text_column="text", label_column="label", max_length=32,
                                                 task_column="task")
    return examples


def brute_force_log_likelihood(model, prompt_ids: list[int], label_ids: list[int], adapter: str) -> float:
    """log p(label_ids | prompt_ids) from the full logits of the one row, summed in float64."""
    ids = torch.tensor([prompt_ids + label_ids])
    with torch.no_grad():
        logits = model(ids, adapter_names=[adapter]).logits[0].double()  # [T, V]
    log_probabilities = logits.log_softmax(dim=-1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(label_ids) - 1)  # position j predicts token j + 1
    return sum(float(log_probabilities[position, token]) for position, token in zip(positions, label_ids))


def test_label_choices_are_each_tasks_labels_sorted(prompts, tokenizer):
    choices = label_choices(prompts)
    assert [text for text, _ in choices["complaints"]] == ["complaint", "no", "no complaint"]
    assert [text for text, _ in choices["spam"]] == ["ham", "spam"]
    for labels in choices.values():
        for text, ids in labels:
            assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_label_log_likelihoods_equal_the_brute_force_reference(two_task_model, prompts, tokenizer, batch_size):
    """Batches of 4 rows cut a prompt's candidates apart and mix both adapters; 64 holds all 18 rows at once."""
    choices = label_choices(prompts)
    scores = label_log_likelihoods(two_task_model, tokenizer, prompts, choices, batch_size=batch_size)
    expected = [[brute_force_log_likelihood(two_task_model, prompt["input_ids"], list(ids), prompt["task"])
                 for _, ids in choices[prompt["task"]]] for prompt in prompts]
    torch.testing.assert_close(torch.tensor(sum(scores, []), dtype=torch.float64),
                               torch.tensor(sum(expected, []), dtype=torch.float64), **TOLERANCE)
    ranked = rank_labels(prompts, choices, scores)
    best = [choices[prompt["task"]][max(range(len(row)), key=row.__getitem__)][0]
            for prompt, row in zip(prompts, expected)]
    assert ranked == best
    gold = [prompt["label_text"] for prompt in prompts]
    assert label_accuracy(ranked, gold) == sum(a == b for a, b in zip(best, gold)) / len(gold)


def test_the_best_score_wins_and_a_tie_goes_to_the_first_label():
    choices = {"t": [("ham", [1, 2]), ("spam", [3, 2])], "u": [("no", [4, 2]), ("yes", [5, 2])]}
    prompts = [{"task": "t"}, {"task": "u"}, {"task": "t"}]
    assert rank_labels(prompts, choices, [[-3.0, -0.5], [-0.1, -2.0], [-1.0, -1.0]]) == ["spam", "no", "ham"]


def test_a_task_without_candidates_is_refused(two_task_model, prompts, tokenizer):
    from softprompt.data import DataError

    with pytest.raises(DataError, match="has task 'spam', which has no candidate labels among \\['complaints'\\]"):
        label_log_likelihoods(two_task_model, tokenizer, prompts, {"complaints": [("no", [81, 82, 2])]}, 8)


@pytest.mark.parametrize("layout", ["prefix", "sequence"])
def test_per_row_losses_are_each_rows_loss_alone(tiny_bloom, tokenizer, layout):
    """``reduction="per_row"``: row i's value is the summed loss of row i run alone (and they add up to ``sum``),
    with adapters of all three methods and the base model in one left-padded batch."""
    torch.manual_seed(0)
    model = SoftPromptModel(tiny_bloom, PromptTuningConfig(num_virtual_tokens=4), adapter_name="prompt")
    model.add_adapter("encoder", PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8))
    model.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=2))
    names = ["prompt", "prefix", None, "encoder"]
    batch = left_padded_batch(tokenizer, ["Tweet text : my flight was cancelled again Label : complaint",
                                          "Tweet text : thanks Label :", "the crew was lovely",
                                          "Tweet text : lost bag Label : no complaint"])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    # A left-padded row's first real token is predicted from padding here and from nothing alone: unscored.
    first_real = batch["attention_mask"].argmax(dim=1)
    labels[torch.arange(len(names)), first_real] = -100
    per_row = model.compute_loss(batch["input_ids"], batch["attention_mask"], labels, names, reduction="per_row",
                                 virtual_token_layout=layout)
    assert per_row.shape == (len(names),)
    total = model.compute_loss(batch["input_ids"], batch["attention_mask"], labels, names, reduction="sum",
                               virtual_token_layout=layout)
    torch.testing.assert_close(per_row.sum(), total, **TOLERANCE)
    for row, name in enumerate(names):
        real = batch["attention_mask"][row].bool()
        alone = model.compute_loss(batch["input_ids"][row, real][None], None, labels[row, real][None], [name],
                                   reduction="sum", virtual_token_layout=layout)
        torch.testing.assert_close(per_row[row], alone, **TOLERANCE, msg=f"row {row} ({name})")
    per_row.sum().backward()  # differentiable like the other reductions
    assert model.prompts["prompt"].embedding.weight.grad.abs().sum() > 0
