"""Two prompt-tuning adapters on one frozen bloomz-560m (the "prompt tuning with PEFT" notebook: awesome-chatgpt-prompts
and english_quotes, 4 random virtual tokens each), with softprompt: the notebook's steps and names, PEFT's imports
swapped for softprompt's.

    python examples/two_adapters.py            # bigscience/bloomz-560m and the two hub datasets (hub access)
    python examples/two_adapters.py --offline  # a tiny random BLOOM and the shipped prompts / quotes: seconds on a CPU

Each adapter trains with ``transformers.Trainer`` and ``DataCollatorForLanguageModeling``, is saved with
``trainer.model.save_pretrained``, and both are loaded back onto the one base: the first with
``SoftPromptModel.from_pretrained`` (PEFT: ``PeftModel.from_pretrained``), the second with ``load_adapter``, then
switched with ``set_adapter``. softprompt can also run both in one batch (``adapter_names``), which PEFT cannot.
Everything goes to ``runs/two-adapters/``.
"""

import sys

from datasets import Dataset, DatasetDict, load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from softprompt import PromptTuningConfig, PromptTuningInit, SoftPromptModel

OFFLINE = "--offline" in sys.argv  # no hub: a tiny random BLOOM written locally and the shipped data (the tests)
working_dir = "runs/two-adapters"
NUM_VIRTUAL_TOKENS = 4
NUM_EPOCHS = 6

if OFFLINE:
    from softprompt.quickstart import build_tiny_bloom, build_tokenizer, save_tiny_bloom, shipped_rows

    tiny_bloom = build_tiny_bloom(len(build_tokenizer()), initializer_range=0.3)  # 0.3: see build_tiny_bloom
    model_name = str(save_tiny_bloom(f"{working_dir}/tiny-bloom", model=tiny_bloom))
    data_prompt = DatasetDict(train=Dataset.from_list(shipped_rows("prompts")))
    data_sentences = DatasetDict(train=Dataset.from_list(shipped_rows("quotes")))
else:
    model_name = "bigscience/bloomz-560m"
    data_prompt = load_dataset("fka/awesome-chatgpt-prompts")
    data_sentences = load_dataset("Abirate/english_quotes")

tokenizer = AutoTokenizer.from_pretrained(model_name, padding_side="left")
foundational_model = AutoModelForCausalLM.from_pretrained(model_name)


def get_outputs(model, inputs, max_new_tokens=100, **options):
    return model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        max_new_tokens=max_new_tokens,
        temperature=0.2,
        top_p=0.95,
        do_sample=True,
        repetition_penalty=1.5,
        eos_token_id=tokenizer.eos_token_id,
        **options,
    )


data_prompt = data_prompt.map(lambda samples: tokenizer(samples["prompt"]), batched=True)
train_sample_prompt = data_prompt["train"].select(range(50))
data_sentences = data_sentences.map(lambda samples: tokenizer(samples["quote"]), batched=True)
train_sample_sentences = data_sentences["train"].select(range(50))

generation_config = PromptTuningConfig(
    prompt_tuning_init=PromptTuningInit.RANDOM,
    num_virtual_tokens=NUM_VIRTUAL_TOKENS,
    tokenizer_name_or_path=model_name,
)
peft_model_prompt = SoftPromptModel(foundational_model, generation_config)  # PEFT: get_peft_model(...)
peft_model_prompt.print_trainable_parameters()
peft_model_sentences = SoftPromptModel(foundational_model, generation_config)  # the same frozen base, once in memory


def create_training_arguments(path, learning_rate=0.0035, epochs=NUM_EPOCHS):
    return TrainingArguments(
        output_dir=path,
        auto_find_batch_size=True,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        report_to="none",
    )


def create_trainer(model, training_args, train_dataset):
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )


output_directory_prompt = f"{working_dir}/peft_outputs_prompt"
trainer_prompt = create_trainer(
    peft_model_prompt, create_training_arguments(output_directory_prompt), train_sample_prompt
)
trainer_prompt.train()
trainer_prompt.model.save_pretrained(output_directory_prompt)

output_directory_sentences = f"{working_dir}/peft_outputs_sentences"
trainer_sentences = create_trainer(
    peft_model_sentences, create_training_arguments(output_directory_sentences), train_sample_sentences
)
trainer_sentences.train()
trainer_sentences.model.save_pretrained(output_directory_sentences)

loaded_model_prompt = SoftPromptModel.from_pretrained(foundational_model, output_directory_prompt, is_trainable=False)
input_prompt = tokenizer("I want you to act as a motivational coach. ", return_tensors="pt")
print("prompts:", tokenizer.batch_decode(get_outputs(loaded_model_prompt, input_prompt), skip_special_tokens=True))

loaded_model_prompt.load_adapter(output_directory_sentences, adapter_name="quotes")
loaded_model_prompt.set_adapter("quotes")
input_sentences = tokenizer("There are two nice things that should matter to you:", return_tensors="pt")
print("quotes:", tokenizer.batch_decode(get_outputs(loaded_model_prompt, input_sentences), skip_special_tokens=True))

# Beyond PEFT: each row of one batch with its own adapter ("default" is the first one loaded).
prompts = ["I want you to act as a motivational coach. ", "There are two nice things that should matter to you:"]
both = tokenizer(prompts, return_tensors="pt", padding=True)
outputs = get_outputs(loaded_model_prompt, both, max_new_tokens=30, adapter_names=["default", "quotes"])
print("one batch:", tokenizer.batch_decode(outputs[:, both["input_ids"].shape[1]:], skip_special_tokens=True))
