"""Config validation messages, and parameter counts equal to PEFT's published figures (meta device)."""

from __future__ import annotations

import pytest
import torch

from softprompt import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, SoftPromptModel
from softprompt.families.bloom import BLOOM_SHAPES, bloom_config
from softprompt.methods.spec import Paper
from softprompt.params import SEED_CONFIGS, base_model_config, parameter_counts
from softprompt.cli import main


@pytest.mark.parametrize("config_class", [PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig])
@pytest.mark.parametrize("value", [0, -3, None, 2.5])
def test_num_virtual_tokens_must_be_positive(config_class, value):
    with pytest.raises(ValueError, match=rf"num_virtual_tokens={value!r}: expected a positive int.*Fix: pass e.g."):
        config_class(num_virtual_tokens=value)


def test_bad_config_values_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"prompt_tuning_init='WORDS': expected one of RANDOM, TEXT, SAMPLE_VOCAB"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="WORDS")
    with pytest.raises(ValueError, match=r"prompt_tuning_init_text=None with prompt_tuning_init=TEXT"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match=r"encoder_reparameterization_type='GRU': expected 'MLP' or 'LSTM'"):
        PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match=r"encoder_dropout=1.5: expected a probability in \[0, 1\)"):
        PromptEncoderConfig(num_virtual_tokens=4, encoder_dropout=1.5)
    with pytest.raises(ValueError, match=r"encoder_hidden_size=0: expected a positive int or None"):
        PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=0)
    # Lower-case names are accepted, as PEFT users sometimes write them.
    assert PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="lstm").encoder_reparameterization_type.value == "LSTM"


@pytest.mark.parametrize(
    ("config_class", "field", "value", "expected"),
    [
        # None and True are what a YAML/JSON config file gives for `null` / `true`: a clear ValueError, not a
        # TypeError from float(None) or a bool accepted as the int 1.
        (PromptEncoderConfig, "encoder_dropout", None, r"a probability in \[0, 1\)"),
        (PromptEncoderConfig, "encoder_dropout", True, r"a probability in \[0, 1\)"),
        (PromptEncoderConfig, "encoder_num_layers", True, "a positive int"),
        (PromptEncoderConfig, "encoder_hidden_size", True, "a positive int or None"),
        (PrefixTuningConfig, "encoder_hidden_size", True, "a positive int or None"),
    ],
)
def test_null_and_bool_config_values_are_refused_by_name(config_class, field, value, expected):
    with pytest.raises(ValueError, match=rf"{field}={value!r}: expected {expected}.*Fix:"):
        config_class(num_virtual_tokens=4, **{field: value})


def test_a_papers_arxiv_id_is_checked():
    assert Paper("Li and Liang", 2021, "2101.00190", "Prefix-Tuning").url == "https://arxiv.org/abs/2101.00190"
    with pytest.raises(ValueError, match=r"arxiv='arXiv:2101.00190v4': expected an arXiv id such as .*Fix: pass"):
        Paper("Li and Liang", 2021, "arXiv:2101.00190v4", "Prefix-Tuning")


def test_init_text_without_a_tokenizer_is_refused(tiny_bloom):
    config = PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="Hello")
    with pytest.raises(ValueError, match=r"prompt_tuning_init=TEXT needs a tokenizer, got tokenizer=None. Fix:"):
        SoftPromptModel(tiny_bloom, config)


def test_unknown_config_type_is_refused(tiny_bloom):
    with pytest.raises(ValueError, match=r"config of type dict: expected PromptTuningConfig"):
        SoftPromptModel(tiny_bloom, {"num_virtual_tokens": 4})


def test_per_row_adapter_names_are_checked(tiny_bloom, batch):
    model = SoftPromptModel(tiny_bloom, PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match=r"adapter_names has 2 entries for a batch of 3 rows"):
        model(batch["input_ids"], adapter_names=["default", None])
    with pytest.raises(ValueError, match=r"Unknown adapter name\(s\) \['nope'\]: loaded adapters are \['default'\]"):
        model(batch["input_ids"], adapter_names=["default", None, "nope"])


# PEFT 0.21.2's print_trainable_parameters on bigscience/bloomz-560m (base 559,214,592 with tied weights once).
PEFT_COUNTS_BLOOMZ_560M = {
    "prompt tuning, 8 tokens": (8_192, 559_222_784),
    "prompt tuning, 4 tokens": (4_096, 559_218_688),
    "p-tuning MLP, 20 tokens, h=128": (300_288, 559_514_880),
    "p-tuning LSTM, 20 tokens, h=128": (1_926_400, 561_140_992),
    "prefix tuning, 20 tokens": (983_040, 560_197_632),
    # 20 x 1024 table + Linear(1024, 1024) + Linear(1024, 2 x 24 x 1024), biases included.
    "prefix tuning, 20 tokens, projection": (51_450_880, 610_665_472),
    # P * C + N * P * r + N * r * C.
    "multitask, 20 tokens, 2 tasks, rank 1": (22_568, 559_237_160),
    # delta [10, C]; the frozen copy of the context's embeddings counts in all params.
    "CPT, 10-token context": (10_240, 559_235_072),
    # The first of the 20 positions is frozen: counted in all params, not in the trainable ones.
    "cartridge, 20 tokens, 1 frozen": (933_888, 560_197_632),
}
ADAPTION_PROMPT = "adaption prompt, 10 tokens, top 8 layers"  # PEFT refuses BLOOM for it: no figure of PEFT's


def test_parameter_counts_equal_peft_on_the_meta_device():
    rows = parameter_counts(base_model_config("bigscience/bloomz-560m"), SEED_CONFIGS)
    counts = {row.label: (row.trainable, row.total) for row in rows}
    assert counts.pop(ADAPTION_PROMPT) == (8 * (10 * 1024 + 1), 559_214_592 + 8 * (10 * 1024 + 1))  # tokens + gate
    assert counts == PEFT_COUNTS_BLOOMZ_560M


def test_the_readme_methods_table_counts_are_pefts():
    """The README's generated methods table (scripts/readme_tables.py): every count cell is PEFT's, from its published
    bloomz-560m figures and from PEFT itself on Llama-3.2-1B, where it runs all seven methods."""
    from peft import get_peft_model

    import readme_tables
    from peft_reference import peft_config_for
    from softprompt.methods import METHODS
    from softprompt.params import meta_base_model

    rows = readme_tables.method_rows()
    bloomz, llama = (readme_tables.model_column(name) for name in readme_tables.COUNTED_ON)
    assert [row["method"].split("`")[1] for row in rows] == [spec.cli_name for spec in METHODS.values()]
    llama_config = base_model_config("meta-llama/Llama-3.2-1B")
    for row, (label, config) in zip(rows, readme_tables.counted_configs().values()):
        assert row["counted as"] == label
        if label == ADAPTION_PROMPT:  # PEFT refuses BLOOM: the tokens and the gate of each of the 8 layers
            assert row[bloomz] == f"{8 * (10 * 1024 + 1):,d}"
        else:
            assert row[bloomz] == f"{PEFT_COUNTS_BLOOMZ_560M[label][0]:,d}", label
        peft_model = get_peft_model(meta_base_model(llama_config), peft_config_for(config))
        assert row[llama] == f"{peft_model.get_nb_trainable_parameters()[0]:,d}", label


def test_counting_uses_no_memory_for_weights():
    config = bloom_config(*BLOOM_SHAPES["7b1"])
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    counted = SoftPromptModel(model, PromptTuningConfig(num_virtual_tokens=8))
    assert all(p.is_meta for p in counted.parameters())
    assert counted.num_parameters()[0] == 8 * 4096


def test_params_command_prints_pefts_wording(capsys):
    assert main(["params"]) == 0
    out = capsys.readouterr().out
    assert "prompt tuning, 8 tokens" in out
    assert "trainable params: 8,192 || all params: 559,222,784 || trainable%: 0.0015" in out
    assert "trainable params: 983,040 || all params: 560,197,632" in out
    assert main(["params", "--model", "bigscience/bloom-1b1", "--method", "prefix-tuning"]) == 0
    assert f"trainable params: {20 * 2 * 24 * 1536:,d}" in capsys.readouterr().out


def test_params_command_reads_a_local_model_directory(tmp_path, tiny_bloom, capsys):
    tiny_bloom.save_pretrained(tmp_path)
    assert main(["params", "--model", str(tmp_path), "--method", "prompt-tuning", "--num-virtual-tokens", "5"]) == 0
    total = sum(p.numel() for p in tiny_bloom.parameters()) + 5 * 32
    assert f"trainable params: 160 || all params: {total:,d}" in capsys.readouterr().out


def test_params_command_explains_an_unknown_model(tmp_path, capsys):
    assert main(["params", "--model", str(tmp_path / "missing")]) == 2
    assert "Built-in names that work offline" in capsys.readouterr().err
