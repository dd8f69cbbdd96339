"""A plain ``transformers.Trainer`` with a `SoftPromptModel`, as the guides use it: ``DataCollatorForLanguageModeling``
batches, checkpoints that hold the adapters and Trainer's own state but never the frozen base, resuming bit for bit
on CPU (the p-tuning encoder included, which PEFT's resume loses), ``load_best_model_at_end``, gradient
accumulation, and ``trainer.model.save_pretrained``.

The seam is ``SoftPromptModel.state_dict()``, which holds the adapters only (``softprompt/module_state.py``):
Trainer saves and loads ``state_dict()`` for any model that is not a ``PreTrainedModel``."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from datasets import Dataset
from peft import TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

import softprompt
from softprompt import AdapterFormatError, SoftPromptModel
from softprompt.quickstart import build_tiny_bloom, shipped_rows

METHODS = {
    "prompt-tuning": softprompt.PromptTuningConfig(num_virtual_tokens=4),
    "p-tuning-mlp": softprompt.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    "p-tuning-lstm": softprompt.PromptEncoderConfig(
        num_virtual_tokens=4, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
    ),
    "prefix-projection": softprompt.PrefixTuningConfig(
        num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16
    ),
    "adaption-prompt": softprompt.AdaptionPromptConfig(adapter_len=4, adapter_layers=2),
}
HIDDEN_SIZE = 128  # big enough that Trainer's fixed-size files (RNG states, arguments, tokenizer) are a small part


def complaints(tokenizer, part: slice) -> Dataset:
    """Shipped complaint tweets with their labels, tokenized as the guides do (the collator pads and labels)."""
    rows = shipped_rows("complaints")[part]
    texts = [f"Tweet text : {row['Tweet text']} Label : {row['text_label']}" for row in rows]
    return Dataset.from_dict({"text": texts}).map(lambda batch: tokenizer(batch["text"]), batched=True,
                                                 remove_columns=["text"])


def new_model(tokenizer, config) -> SoftPromptModel:
    """The same starting point every time: base and adapter initialization both seeded."""
    base = build_tiny_bloom(len(tokenizer), hidden_size=HIDDEN_SIZE, seed=0, initializer_range=0.3)
    torch.manual_seed(0)
    return SoftPromptModel(base, copy.deepcopy(config))


class StopAfter(TrainerCallback):
    """Stops the run by raising once `step` optimizer steps are done: a run killed between checkpoints."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def trainer_for(model, tokenizer, output_dir, callbacks=(), train_dataset=None, **arguments) -> Trainer:
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=6, save_strategy="steps", save_steps=2,
        learning_rate=3e-2, seed=0, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
    )
    settings.update(arguments)
    return Trainer(
        model=model,
        args=TrainingArguments(**settings),
        # 4 steps an epoch: 6 steps cross an epoch boundary.
        train_dataset=complaints(tokenizer, slice(0, 16)) if train_dataset is None else train_dataset,
        eval_dataset=complaints(tokenizer, slice(16, 24)),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=list(callbacks),
    )


def base_bytes(model: SoftPromptModel) -> int:
    """The frozen base's size in memory, tied tensors once."""
    tensors = {tensor.data_ptr(): tensor for tensor in model.base_model.state_dict().values()}
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def test_state_dict_is_the_adapters_and_loads_back(tiny_bloom):
    torch.manual_seed(0)
    model = SoftPromptModel(tiny_bloom, METHODS["p-tuning-mlp"])
    model.add_adapter("prefix", METHODS["prefix-projection"])
    state = model.state_dict()
    assert state and all(key.startswith("prompts.") for key in state)
    assert sorted(state) == sorted(f"prompts.{key}" for key in model.prompts.state_dict())
    wrapper = torch.nn.ModuleDict({"inner": model})  # also when the model sits inside another module
    assert sorted(wrapper.state_dict()) == sorted(f"inner.{key}" for key in state)

    torch.manual_seed(1)
    other = SoftPromptModel(tiny_bloom, METHODS["p-tuning-mlp"])
    other.add_adapter("prefix", METHODS["prefix-projection"])
    result = other.load_state_dict(state)  # strict: no base tensor needed, none reported missing
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(other.state_dict()[key], value) for key, value in state.items())
    full = {**state, **{f"base_model.{key}": value for key, value in tiny_bloom.state_dict().items()}}
    assert other.load_state_dict(full).missing_keys == []  # base tensors, when given, load like any other
    partial = {key: value for key, value in state.items() if ".prefix." not in key}
    with pytest.raises(RuntimeError, match=r"missing keys \['prompts.prefix.embedding.weight'"):
        other.load_state_dict(partial)
    assert other.load_state_dict(partial, strict=False).missing_keys[0].startswith("prompts.prefix.")


def test_checkpoints_hold_the_adapters_and_trainer_state_but_no_base_tensor(tokenizer, tmp_path):
    model = new_model(tokenizer, METHODS["prompt-tuning"])
    trainer_for(model, tokenizer, tmp_path).train()
    checkpoints = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    adapter_numel = sum(parameter.numel() for parameter in model.prompts.parameters())
    for name in checkpoints:
        checkpoint = tmp_path / name
        # The adapters, as state_dict() gives them; no tensor of the base.
        weights = load_file(checkpoint / "model.safetensors")
        assert sorted(weights) == sorted(model.state_dict()) == ["prompts.default.embedding.weight"]
        # Trainer's own state beside them: AdamW's two moments of the adapter's parameters, and nothing larger.
        optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        moments = [value for state in optimizer["state"].values() for key, value in state.items() if key != "step"]
        assert sum(moment.numel() for moment in moments) == 2 * adapter_numel
        assert {"scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {path.name for path in checkpoint.iterdir()}
        size = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file())
        # About 5% here, nearly all of it fixed-size files (the collator's tokenizer, RNG states, arguments); the
        # base's embedding matrix alone would be 30%.
        assert size < 0.1 * base_bytes(model), (name, size, base_bytes(model))

    with pytest.raises(AdapterFormatError, match=r"a transformers.Trainer checkpoint .* holds the adapters' tensors, "
                       r"not their configs\. Fix: resume with trainer.train\(resume_from_checkpoint=\.\.\.\)"):
        SoftPromptModel.from_pretrained(model.base_model, tmp_path / "checkpoint-4")
    restored = new_model(tokenizer, METHODS["prompt-tuning"])  # the fix the message gives
    restored.load_state_dict(load_file(tmp_path / "checkpoint-6" / "model.safetensors"))
    assert torch.equal(restored.prompts["default"].embedding.weight, model.prompts["default"].embedding.weight)


@pytest.mark.parametrize("method", list(METHODS))
def test_resuming_from_the_step_2_checkpoint_ends_with_the_uninterrupted_runs_adapter(method, tokenizer, tmp_path):
    uninterrupted = new_model(tokenizer, METHODS[method])
    full = trainer_for(uninterrupted, tokenizer, tmp_path / "full")
    full.train()

    with pytest.raises(KeyboardInterrupt):  # killed after step 3: checkpoint-2 is the newest
        trainer_for(new_model(tokenizer, METHODS[method]), tokenizer, tmp_path / "run", [StopAfter(3)]).train()
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["checkpoint-2"]
    resumed = new_model(tokenizer, METHODS[method])  # a fresh process would build the model the same way
    again = trainer_for(resumed, tokenizer, tmp_path / "run")
    again.train(resume_from_checkpoint=True)

    # Bit for bit (torch.equal): the same operations on the same numbers in the same order, on CPU.
    final, expected = resumed.state_dict(), uninterrupted.state_dict()
    assert sorted(final) == sorted(expected)
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    # The resumed log starts with the checkpoint's two steps, then logs the four it ran: the same six losses.
    losses = lambda trainer: [log["loss"] for log in trainer.state.log_history if "loss" in log]  # noqa: E731
    assert len(losses(full)) == 6 and losses(again) == losses(full)


def test_peft_resume_loses_a_p_tuning_encoder(tokenizer, tmp_path):
    """What the README says of PEFT: its checkpoints keep the encoder's output, not its weights, so a resumed
    p-tuning run does not continue where the uninterrupted one goes (ours does: the test above)."""

    def peft_model():
        base = build_tiny_bloom(len(tokenizer), hidden_size=HIDDEN_SIZE, seed=0, initializer_range=0.3)
        torch.manual_seed(0)
        config = peft.PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, encoder_hidden_size=16)
        return get_peft_model(base, config)

    uninterrupted = peft_model()
    trainer_for(uninterrupted, tokenizer, tmp_path / "full").train()
    resumed = peft_model()
    trainer = trainer_for(resumed, tokenizer, tmp_path / "full")
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    ids = torch.arange(4)
    with torch.no_grad():
        assert not torch.equal(resumed.prompt_encoder["default"](ids), uninterrupted.prompt_encoder["default"](ids))


def test_load_best_model_at_end_restores_the_best_adapter(tokenizer, tmp_path):
    model = new_model(tokenizer, METHODS["p-tuning-mlp"])
    trainer = trainer_for(
        model, tokenizer, tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        # The highest eval loss counts as best here: the loss falls, so the best checkpoint is an early one and
        # restoring it must change the adapter.
        metric_for_best_model="eval_loss", greater_is_better=True,
    )
    trainer.train()
    evaluations = {log["step"]: log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log}
    best_step = max(evaluations, key=evaluations.get)
    assert best_step != 6 and trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    best = load_file(tmp_path / f"checkpoint-{best_step}" / "model.safetensors")
    last = load_file(tmp_path / "checkpoint-6" / "model.safetensors")
    state = model.state_dict()
    assert sorted(state) == sorted(best)
    assert all(torch.equal(state[key], best[key]) for key in best)
    assert not all(torch.equal(state[key], last[key]) for key in last)

    model.save_pretrained(tmp_path / "best")  # trainer.model is our model: the guides' save call
    loaded = SoftPromptModel.from_pretrained(model.base_model, tmp_path / "best", is_trainable=True)
    assert all(torch.equal(loaded.state_dict()[key], best[key]) for key in best)  # the encoder too


def test_gradient_accumulation_averages_the_micro_batches(tokenizer, tmp_path):
    """Trainer divides each micro-batch's mean loss by the accumulation steps (``accepts_loss_kwargs = False``):
    with plain SGD, 2 x 2 rows make the step of the mean loss over the 4 rows (equal lengths, so the mean of the
    two means is that mean)."""
    ids = [tokenizer(f"Tweet text : {word} {word} {word} Label : complaint")["input_ids"] for word in "abcd"]
    assert len({len(row) for row in ids}) == 1
    model = new_model(tokenizer, METHODS["prompt-tuning"])
    start = model.prompts["default"].embedding.weight.detach().clone()
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(4, len(ids[0]), dtype=torch.long)}
    model.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    expected = start - 0.5 * model.prompts["default"].embedding.weight.grad
    model.zero_grad()

    trainer = trainer_for(model, tokenizer, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                          max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0,
                          save_strategy="no", train_dataset=Dataset.from_dict({"input_ids": ids}))
    trainer.train()
    # fp32: the same per-token losses summed in two halves instead of one sum, a few ulps of the gradient.
    torch.testing.assert_close(model.prompts["default"].embedding.weight, expected, rtol=1e-5, atol=1e-7)
