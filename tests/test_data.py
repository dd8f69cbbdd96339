"""Tests of data loading and batching (softprompt/data.py), the recipes (softprompt/recipes.py), the offline
quickstart assets (softprompt/quickstart.py) and the generators of the shipped data (scripts/shipped_data.py)."""

from __future__ import annotations

import csv
import json
import random

import datasets
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import shipped_data

from softprompt import data, quickstart, recipes

TEXT_COLUMN = "Tweet text"
LABEL_COLUMN = "text_label"


@pytest.fixture(scope="module")
def tokenizer():
    return quickstart.build_tokenizer()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- Classification recipe --------------------------------------------------------------------------------------


def test_classification_layout_is_prompt_then_label_then_eos(tokenizer):
    rows = [{TEXT_COLUMN: "I hate this airline", LABEL_COLUMN: "complaint"}]
    (example,) = recipes.classification_examples(
        rows, tokenizer, text_column=TEXT_COLUMN, label_column=LABEL_COLUMN, max_length=64
    )
    prompt_ids = encode(tokenizer, "Tweet text : I hate this airline Label : ")
    label_ids = encode(tokenizer, "complaint")
    eos = tokenizer.eos_token_id

    assert example["input_ids"] == prompt_ids + label_ids + [eos]
    assert example["labels"] == [-100] * len(prompt_ids) + label_ids + [eos]
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert tokenizer.decode(example["input_ids"][: len(prompt_ids)]) == "Tweet text : I hate this airline Label : "
    assert tokenizer.decode(example["input_ids"][len(prompt_ids) :]) == "complaint</s>"


def test_classification_on_a_loaded_dataset_keeps_task_and_matches_eval_prompts(tokenizer):
    rows = data.load_rows(quickstart.shipped_dataset_path("complaints"), split="train[:40]")
    rows = rows.add_column("task", ["complaints"] * len(rows))
    kwargs = dict(text_column=TEXT_COLUMN, label_column=LABEL_COLUMN, max_length=64, task_column="task")
    train = recipes.classification_examples(rows, tokenizer, **kwargs)
    evaluation = recipes.classification_eval_examples(rows, tokenizer, **kwargs)

    assert len(train) == len(evaluation) == 40
    for row, train_example, eval_example in zip(rows, train, evaluation):
        prompt_length = len(eval_example["input_ids"])
        assert train_example["task"] == eval_example["task"] == "complaints"
        assert train_example["input_ids"][:prompt_length] == eval_example["input_ids"]
        assert train_example["input_ids"][prompt_length:] == eval_example["label_ids"]
        assert eval_example["label_text"] == row[LABEL_COLUMN]
        assert eval_example["label_ids"][-1] == tokenizer.eos_token_id


def test_long_text_loses_its_start_and_label_always_fits(tokenizer):
    text = " ".join(f"word{index}" for index in range(200)) + " the flight was delayed"
    rows = [
        {TEXT_COLUMN: text, LABEL_COLUMN: "complaint"},
        {TEXT_COLUMN: "short one", LABEL_COLUMN: "no complaint"},
    ]
    max_length = 24
    examples = recipes.classification_examples(
        rows, tokenizer, text_column=TEXT_COLUMN, label_column=LABEL_COLUMN, max_length=max_length
    )
    long_example = examples[0]
    target = encode(tokenizer, "complaint") + [tokenizer.eos_token_id]

    assert len(long_example["input_ids"]) <= max_length
    assert long_example["input_ids"][-len(target) :] == target
    assert long_example["labels"][-len(target) :] == target
    prompt = tokenizer.decode(long_example["input_ids"][: -len(target)])
    assert prompt.startswith("Tweet text : ") and prompt.endswith(" Label : ")
    kept_text = prompt[len("Tweet text : ") : -len(" Label : ")]
    assert kept_text and text.endswith(kept_text)
    assert kept_text.endswith("the flight was delayed")
    # The room for the prompt is set by the longest label ("no complaint"), so the budget is used nearly fully.
    longest_target = len(encode(tokenizer, "no complaint")) + 1
    assert len(long_example["input_ids"]) - len(target) >= max_length - longest_target - 2


def test_label_that_cannot_fit_names_row_and_max_length(tokenizer):
    rows = [
        {TEXT_COLUMN: "fine", LABEL_COLUMN: "complaint"},
        {TEXT_COLUMN: "fine", LABEL_COLUMN: "a very long label that takes many many tokens indeed"},
    ]
    with pytest.raises(data.DataError, match=r"Row 1: the label .* exceeds max_length=12\. Fix: raise max_length"):
        recipes.classification_examples(
            rows, tokenizer, text_column=TEXT_COLUMN, label_column=LABEL_COLUMN, max_length=12
        )


def test_missing_column_lists_available_columns(tokenizer):
    rows = [{TEXT_COLUMN: "hello", LABEL_COLUMN: "complaint"}]
    with pytest.raises(data.DataError, match=r"Column 'text' is not in the data; available columns: \['Tweet text', "
                       r"'text_label'\].*--text-column"):
        recipes.classification_examples(rows, tokenizer, text_column="text", label_column=LABEL_COLUMN, max_length=32)
    with pytest.raises(data.DataError, match=r"Column 'Label' is not in the data.*--label-column"):
        recipes.classification_examples(rows, tokenizer, text_column=TEXT_COLUMN, label_column="Label", max_length=32)
    with pytest.raises(data.DataError, match=r"Column 'task' is not in the data.*--task-column"):
        recipes.causal_lm_examples(rows, tokenizer, text_column=TEXT_COLUMN, max_length=32, task_column="task")


def test_missing_values_and_empty_rows_are_reported(tokenizer):
    with pytest.raises(data.DataError, match=r"Row 1, column 'text_label': expected text, got None"):
        recipes.classification_examples(
            [{TEXT_COLUMN: "a", LABEL_COLUMN: "complaint"}, {TEXT_COLUMN: "b", LABEL_COLUMN: None}],
            tokenizer, text_column=TEXT_COLUMN, label_column=LABEL_COLUMN, max_length=32,
        )
    with pytest.raises(data.DataError, match="rows is empty"):
        recipes.causal_lm_examples([], tokenizer, text_column="quote", max_length=32)


def test_label_accuracy():
    assert recipes.label_accuracy(["complaint ", "no complaint"], ["complaint", "complaint"]) == 0.5
    with pytest.raises(data.DataError, match="2 predictions for 1 references"):
        recipes.label_accuracy(["a", "b"], ["a"])


# --- Causal-LM recipe -------------------------------------------------------------------------------------------


def test_causal_lm_examples_score_every_token_and_truncate(tokenizer):
    rows = [{"quote": "Be kind, because small things become large things."}, {"quote": "Hope."}]
    examples = recipes.causal_lm_examples(rows, tokenizer, text_column="quote", max_length=6)
    full_ids = encode(tokenizer, rows[0]["quote"]) + [tokenizer.eos_token_id]
    assert examples[0]["input_ids"] == full_ids[:6]
    assert examples[1]["input_ids"] == encode(tokenizer, "Hope.") + [tokenizer.eos_token_id]
    for example in examples:
        assert example["labels"] == example["input_ids"]
        assert example["attention_mask"] == [1] * len(example["input_ids"])


# --- Loading ----------------------------------------------------------------------------------------------------


def test_csv_json_jsonl_parquet_load_the_same_rows(tmp_path):
    rows = shipped_data.generate_complaints(12, seed=3)
    rows[0][TEXT_COLUMN] = 'Quotes "inside", commas, and ünïcode 🙂'
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "rows.csv", index=False)
    frame.to_json(tmp_path / "rows.json", orient="records", force_ascii=False)
    frame.to_json(tmp_path / "rows.jsonl", orient="records", lines=True, force_ascii=False)
    frame.to_parquet(tmp_path / "rows.parquet", index=False)

    for name in ("rows.csv", "rows.json", "rows.jsonl", "rows.parquet"):
        loaded = data.load_rows(tmp_path / name)
        assert isinstance(loaded, datasets.Dataset)
        assert loaded.column_names == [TEXT_COLUMN, LABEL_COLUMN], name
        assert loaded.to_list() == rows, name
    assert data.load_rows(tmp_path / "rows.csv", split="train[:5]").to_list() == rows[:5]


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "complaints.csv"
    with pytest.raises(data.DataFileNotFoundError, match=r"Data file '.*nowhere/complaints\.csv' does not exist"):
        data.load_rows(missing)
    with pytest.raises(FileNotFoundError):
        data.load_rows(str(missing))


@pytest.mark.parametrize(("name", "content"), [("empty.csv", "Tweet text,text_label\n"), ("empty.jsonl", ""),
                                               ("empty.json", "[]")])
def test_empty_dataset_names_the_source(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(data.DataError, match=rf"The dataset '.*{name}' \(split='train'\) has no rows"):
        data.load_rows(path)


def test_unsupported_extension_and_bad_file(tmp_path):
    text_file = tmp_path / "rows.txt"
    text_file.write_text("hello\n")
    with pytest.raises(data.DataError, match=r"unsupported extension '\.txt': expected one of \.csv, \.json"):
        data.load_rows(text_file)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"quote": "unterminated\n')
    with pytest.raises(data.DataError, match=r"Could not read '.*broken\.jsonl' as json"):
        data.load_rows(broken)


def test_hub_failure_is_wrapped_with_a_local_file_suggestion(monkeypatch):
    calls = []

    def offline_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'ought/raft' on the Hub")

    monkeypatch.setattr(data.datasets, "load_dataset", offline_load_dataset)
    with pytest.raises(data.DataError, match=r"Could not load the dataset 'ought/raft'.*local \.csv") as caught:
        data.load_rows("ought/raft", config_name="twitter_complaints", split="test")
    assert calls == [(("ought/raft", "twitter_complaints"), {"split": "test"})]
    assert isinstance(caught.value.__cause__, ConnectionError)


# --- Collation --------------------------------------------------------------------------------------------------


EXAMPLES = [
    {"input_ids": [10, 11, 12], "attention_mask": [1, 1, 1], "labels": [-100, 11, 12], "task": "a"},
    {"input_ids": [20], "attention_mask": [1], "labels": [20], "task": "b"},
]


def test_collate_left_padding_to_longest():
    batch = data.collate(EXAMPLES, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[10, 11, 12], [3, 3, 20]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 11, 12], [-100, -100, 20]]
    assert batch["task"] == ["a", "b"]
    assert all(batch[name].dtype == torch.long for name in ("input_ids", "attention_mask", "labels"))


def test_collate_right_padding_to_max_length():
    batch = data.collate(EXAMPLES, pad_token_id=3, padding="max_length", max_length=5, padding_side="right")
    assert batch["input_ids"].tolist() == [[10, 11, 12, 3, 3], [20, 3, 3, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, -100], [20, -100, -100, -100, -100]]
    assert batch["input_ids"].shape == (2, 5)


def test_collate_eval_examples_have_no_labels_tensor(tokenizer):
    rows = [
        {TEXT_COLUMN: "thanks a lot", LABEL_COLUMN: "no complaint"},
        {TEXT_COLUMN: "broken", LABEL_COLUMN: "complaint"},
    ]
    examples = recipes.classification_eval_examples(
        rows, tokenizer, text_column=TEXT_COLUMN, label_column=LABEL_COLUMN, max_length=32
    )
    batch = data.collate(examples, pad_token_id=tokenizer.pad_token_id)
    assert "labels" not in batch
    assert batch["label_text"] == ["no complaint", "complaint"]
    # Left padding puts every prompt's last real token in the last column, where generation continues.
    assert (batch["attention_mask"][:, -1] == 1).all()


def test_collate_rejects_bad_input():
    with pytest.raises(data.DataError, match="padding='max_length' needs max_length"):
        data.collate(EXAMPLES, pad_token_id=3, padding="max_length")
    with pytest.raises(data.DataError, match=r"Example 0 has 3 tokens, more than max_length=2"):
        data.collate(EXAMPLES, pad_token_id=3, max_length=2)
    with pytest.raises(data.DataError, match=r"padding_side='middle': expected 'left' or 'right'"):
        data.collate(EXAMPLES, pad_token_id=3, padding_side="middle")
    with pytest.raises(data.DataError, match="examples is empty"):
        data.collate([], pad_token_id=3)
    with pytest.raises(data.DataError, match="expected the same fields in every example"):
        data.collate([EXAMPLES[0], {"input_ids": [1]}], pad_token_id=3)


# --- Quickstart assets ------------------------------------------------------------------------------------------


def test_tokenizer_layout_and_round_trip(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        0, 1, 2, 3,
    )
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tokenizer.padding_side == "left"
    assert quickstart.build_tokenizer(padding_side="right").padding_side == "right"
    assert 300 <= len(tokenizer) <= 2048
    sentence = shipped_data.generate_complaints()[0][TEXT_COLUMN]
    ids = tokenizer(sentence)["input_ids"]
    assert tokenizer.decode(ids) == sentence
    assert 0 not in ids and tokenizer.eos_token_id not in ids  # no <unk>, no special tokens added
    unseen = "Ünïcode 日本 🙂 and words never seen: zyxw"
    assert tokenizer.decode(encode(tokenizer, unseen)) == unseen
    assert quickstart.build_tokenizer().get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("name", sorted(quickstart.SHIPPED_DATASETS))
def test_committed_dataset_files_equal_their_generators(name):
    dataset = quickstart.SHIPPED_DATASETS[name]
    path = quickstart.shipped_dataset_path(name)
    assert path.name == dataset.file_name
    assert path.stat().st_size < 100_000
    assert path.read_text(encoding="utf-8") == shipped_data.render_shipped_dataset(name)
    expected = shipped_data.generate_shipped_rows(name)
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            assert list(csv.DictReader(handle)) == expected
    else:
        assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == expected
    assert data.load_rows(path).to_list() == expected
    assert len(expected) == dataset.num_rows
    assert list(expected[0]) == [dataset.text_column] + ([dataset.label_column] if dataset.label_column else [])


def test_complaints_are_balanced_and_cued():
    rows = shipped_data.generate_complaints()
    labels = [row[LABEL_COLUMN] for row in rows]
    assert set(labels) == {"complaint", "no complaint"}
    assert abs(labels.count("complaint") - labels.count("no complaint")) <= 1
    assert len({row[TEXT_COLUMN] for row in rows}) == len(rows)
    assert shipped_data.generate_complaints(50, seed=7) == shipped_data.generate_complaints(50, seed=7)
    assert shipped_data.generate_complaints(50, seed=7) != shipped_data.generate_complaints(50, seed=8)


def test_shipped_dataset_path_unknown_name_lists_available():
    assert quickstart.shipped_dataset_path("complaints.csv") == quickstart.shipped_dataset_path("complaints")
    with pytest.raises(ValueError, match=r"Unknown shipped dataset 'tweets': expected one of 'complaints'.*'quotes'"):
        quickstart.shipped_dataset_path("tweets")


def test_tiny_bloom_is_seeded_and_leaves_global_rng_alone():
    random_state = torch.random.get_rng_state()
    first = quickstart.build_tiny_bloom(300, seed=5)
    assert torch.equal(torch.random.get_rng_state(), random_state)
    second = quickstart.build_tiny_bloom(300, seed=5)
    other = quickstart.build_tiny_bloom(300, seed=6)
    first_weights = first.transformer.word_embeddings.weight
    assert torch.equal(first_weights, second.transformer.word_embeddings.weight)
    assert not torch.equal(first_weights, other.transformer.word_embeddings.weight)
    assert first.lm_head.weight.data_ptr() == first_weights.data_ptr()
    assert (first.config.pad_token_id, first.config.bos_token_id, first.config.eos_token_id) == (3, 1, 2)
    with pytest.raises(ValueError, match=r"hidden_size=30 with n_head=4"):
        quickstart.build_tiny_bloom(300, hidden_size=30)


def test_tiny_bloom_save_and_from_pretrained_round_trip(tmp_path, tokenizer):
    model = quickstart.build_tiny_bloom(len(tokenizer), seed=1)
    folder = quickstart.save_tiny_bloom(tmp_path / "tiny-bloom", tokenizer=tokenizer, model=model)

    loaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    loaded_model = AutoModelForCausalLM.from_pretrained(folder).eval()

    sentence = shipped_data.generate_quotes()[0]["quote"]
    assert loaded_tokenizer(sentence)["input_ids"] == tokenizer(sentence)["input_ids"]
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert (loaded_tokenizer.pad_token_id, loaded_tokenizer.eos_token_id) == (3, 2)
    assert loaded_tokenizer.padding_side == "left"
    batch = loaded_tokenizer([sentence, "Hope."], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, 0].item() == 3  # left-padded with <pad>
    with torch.no_grad():
        expected = model(**batch).logits
        actual = loaded_model(**batch).logits
    assert expected.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.equal(actual, expected)


def test_generators_do_not_touch_global_random_state():
    state = random.getstate()
    shipped_data.generate_prompts(10, seed=2)
    assert random.getstate() == state
