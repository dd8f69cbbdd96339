"""PEFT's prompt-based-methods guide (bloomz-560m learns to label tweets of RAFT's twitter_complaints as complaint
or no complaint), with softprompt: the guide's steps and names, PEFT's imports swapped for softprompt's.

    python examples/twitter_complaints.py            # bigscience/bloomz-560m and ought/raft, as the guide (hub access)
    python examples/twitter_complaints.py --offline  # a tiny random BLOOM and the shipped data: seconds on a CPU
    python examples/twitter_complaints.py --push-to-hub your-name/bloomz-560m-complaints

The PEFT calls and their softprompt equivalents:

    get_peft_model(model, peft_config)                     SoftPromptModel(model, peft_config, tokenizer=tokenizer)
    model.push_to_hub(peft_model_id)                       the same
    AutoPeftModelForCausalLM.from_pretrained(peft_model_id)  AutoSoftPromptModelForCausalLM.from_pretrained(...)

Two departures from the guide: it trains with ``transformers.Trainer`` (checkpoints every epoch, the best one
restored at the end) instead of a hand-written loop, and its preprocessing appends the label to the input ids,
which the guide forgets (see the README). Everything goes to ``runs/twitter-complaints/``.
"""

import sys

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

from softprompt import AutoSoftPromptModelForCausalLM, PromptTuningConfig, PromptTuningInit, SoftPromptModel

OFFLINE = "--offline" in sys.argv  # no hub: a tiny random BLOOM written locally and the shipped data (the tests)
PUSH_TO = sys.argv[sys.argv.index("--push-to-hub") + 1] if "--push-to-hub" in sys.argv else None
output_dir = "runs/twitter-complaints"
text_column, label_column, max_length = "Tweet text", "text_label", 64

if OFFLINE:
    from softprompt.quickstart import build_tiny_bloom, build_tokenizer, save_tiny_bloom, shipped_rows

    tiny_bloom = build_tiny_bloom(len(build_tokenizer()), initializer_range=0.3)  # 0.3: see build_tiny_bloom
    model_name_or_path = str(save_tiny_bloom(f"{output_dir}/tiny-bloom", model=tiny_bloom))
    ds = Dataset.from_list(shipped_rows("complaints")).train_test_split(test_size=0.2, seed=0)
    num_epochs = 2
else:
    model_name_or_path = "bigscience/bloomz-560m"
    ds = load_dataset("ought/raft", "twitter_complaints")
    classes = [k.replace("_", " ") for k in ds["train"].features["Label"].names]
    ds = ds.map(lambda x: {"text_label": [classes[label] for label in x["Label"]]}, batched=True, num_proc=1)
    ds = ds["train"].train_test_split(test_size=0.2, seed=0)  # RAFT's own test split has no labels
    num_epochs = 50

tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, padding_side="left")
if tokenizer.pad_token_id is None:
    tokenizer.pad_token_id = tokenizer.eos_token_id


def preprocess_function(examples):
    """The prompt, then the label and EOS, left-padded to max_length; the loss only on the label and EOS."""
    model_inputs = {"input_ids": [], "attention_mask": [], "labels": []}
    prompts = tokenizer([f"{text_column} : {x} Label : " for x in examples[text_column]])["input_ids"]
    targets = tokenizer([str(x) for x in examples[label_column]])["input_ids"]
    for prompt_ids, target_ids in zip(prompts, targets):
        target_ids = target_ids + [tokenizer.eos_token_id]
        input_ids = (prompt_ids + target_ids)[-max_length:]  # a long tweet loses its start, never its label
        labels = ([-100] * len(prompt_ids) + target_ids)[-max_length:]
        padding = max_length - len(input_ids)
        model_inputs["input_ids"].append([tokenizer.pad_token_id] * padding + input_ids)
        model_inputs["attention_mask"].append([0] * padding + [1] * len(input_ids))
        model_inputs["labels"].append([-100] * padding + labels)
    return model_inputs


processed_ds = ds.map(preprocess_function, batched=True, remove_columns=ds["train"].column_names)

model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
prompt_tuning_init_text = "Classify if the tweet is a complaint or not:"
peft_config = PromptTuningConfig(
    prompt_tuning_init=PromptTuningInit.TEXT,
    num_virtual_tokens=len(tokenizer(prompt_tuning_init_text)["input_ids"]),
    prompt_tuning_init_text=prompt_tuning_init_text,
    tokenizer_name_or_path=model_name_or_path,
)
model = SoftPromptModel(model, peft_config, tokenizer=tokenizer)
model.print_trainable_parameters()

training_args = TrainingArguments(
    output_dir=output_dir,
    learning_rate=3e-2,
    num_train_epochs=num_epochs,
    per_device_train_batch_size=8,
    max_grad_norm=0.0,  # the guide does not clip
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=2,
    load_best_model_at_end=True,  # checkpoints hold the adapter only; the best one comes back at the end
    report_to="none",
)
trainer = Trainer(
    model=model,
    args=training_args,
    train_dataset=processed_ds["train"],
    eval_dataset=processed_ds["test"],
    data_collator=default_data_collator,
)
trainer.train()

peft_model_id = f"{output_dir}/adapter"
trainer.model.save_pretrained(peft_model_id)
if PUSH_TO:
    model.push_to_hub(PUSH_TO)  # the adapter and a model card; needs `hf auth login`

# Inference, as the guide: one call loads the base model the adapter records, then the adapter.
model = AutoSoftPromptModelForCausalLM.from_pretrained(peft_model_id)
for i in range(3):
    inputs = tokenizer(f'{text_column} : {ds["test"][i][text_column]} Label : ', return_tensors="pt")
    with torch.no_grad():
        outputs = model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=10,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    print(tokenizer.batch_decode(outputs, skip_special_tokens=True)[0], "| expected:", ds["test"][i][label_column])
