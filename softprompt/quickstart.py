"""Offline assets for the embedded default run and for tests: a tiny tokenizer, tiny random models, the shipped
datasets.

Everything here is built locally and deterministically, without the network, so that the default run, the
examples and the tests work on a machine that cannot reach the Hugging Face Hub:

- `build_tokenizer`: a byte-level BPE tokenizer (so any text encodes, nothing maps to ``<unk>``) trained on the
  text of the shipped datasets, with BLOOM's special-token layout (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
  ``<pad>`` 3) and, like BLOOM's tokenizer, no special tokens added by ``tokenizer(text)``.
- `build_tiny_bloom` (the embedded default base) and `build_tiny_model` (any supported family, from its
  `Family.tiny_config`): random, seeded weights.
- `save_tiny_bloom` / `save_tiny_model`: write model and tokenizer with ``save_pretrained`` so that
  ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load them like any
  checkpoint.
- The three synthetic datasets shipped under ``softprompt/data/`` (`SHIPPED_DATASETS`, `shipped_dataset_path`):
  ``complaints`` (classification in the spirit of RAFT twitter_complaints), ``quotes`` and ``prompts`` (plain
  text for the causal-LM recipe, in the spirit of english_quotes and awesome-chatgpt-prompts). Their generators
  live outside the library, in ``scripts/shipped_data.py``.

Shapes: V vocabulary size, C hidden size, L layers, H heads.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import tempfile
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from softprompt.families import family_named


UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
# BLOOM's layout: the special tokens take the first four ids in this order.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
UNK_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
PAD_TOKEN_ID = 3

DEFAULT_VOCAB_SIZE = 2048
"""Upper bound on the BPE vocabulary; the small corpus runs out of merges first (about 1300 tokens)."""

DEFAULT_SEED = 0
COMPLAINTS_NUM_ROWS = 320
QUOTES_NUM_ROWS = 300
PROMPTS_NUM_ROWS = 200

COMPLAINT_LABEL = "complaint"
NO_COMPLAINT_LABEL = "no complaint"

_COMPLAINTS_TEXT_COLUMN = "Tweet text"
_COMPLAINTS_LABEL_COLUMN = "text_label"


@dataclass(frozen=True)
class ShippedDataset:
    """A dataset file shipped in ``softprompt/data/`` and the columns the recipes read from it."""

    file_name: str
    """Name of the file inside ``softprompt/data/``, e.g. ``"complaints.csv"``."""

    text_column: str
    """Column holding the input text."""

    label_column: str | None
    """Column holding the label text for classification datasets; None for plain-text datasets."""

    num_rows: int
    """Number of rows the file holds (the row count its generator was called with)."""

    seed: int
    """Seed its generator was called with."""

    description: str
    """One line saying what the dataset is for."""

    def __post_init__(self) -> None:
        if pathlib.PurePath(self.file_name).name != self.file_name or "." not in self.file_name:
            raise ValueError(
                f"file_name={self.file_name!r}: expected a bare file name with an extension, like 'quotes.jsonl'. "
                "Fix: drop any folder part; the file lives in softprompt/data/."
            )
        if not self.text_column:
            raise ValueError("text_column='': expected the name of the text column. Fix: pass a non-empty name.")
        if self.label_column == "":
            raise ValueError(
                "label_column='': expected a column name or None. Fix: pass None for a plain-text dataset."
            )
        if self.num_rows <= 0:
            raise ValueError(f"num_rows={self.num_rows}: expected a positive row count. Fix: pass e.g. 300.")


SHIPPED_DATASETS: dict[str, ShippedDataset] = {
    "complaints": ShippedDataset(
        file_name="complaints.csv",
        text_column=_COMPLAINTS_TEXT_COLUMN,
        label_column=_COMPLAINTS_LABEL_COLUMN,
        num_rows=COMPLAINTS_NUM_ROWS,
        seed=DEFAULT_SEED,
        description="Synthetic tweets labelled 'complaint' / 'no complaint' (like RAFT twitter_complaints).",
    ),
    "quotes": ShippedDataset(
        file_name="quotes.jsonl",
        text_column="quote",
        label_column=None,
        num_rows=QUOTES_NUM_ROWS,
        seed=DEFAULT_SEED,
        description="Synthetic one-sentence quotes for the causal-LM recipe (like english_quotes).",
    ),
    "prompts": ShippedDataset(
        file_name="prompts.jsonl",
        text_column="prompt",
        label_column=None,
        num_rows=PROMPTS_NUM_ROWS,
        seed=DEFAULT_SEED,
        description="Synthetic 'act as' instructions for the causal-LM recipe (like awesome-chatgpt-prompts).",
    ),
}


def shipped_dataset(name: str) -> ShippedDataset:
    """A shipped dataset by its name or file name.

    Raises:
        ValueError: no shipped dataset has that name; the message lists them.
    """
    if name in SHIPPED_DATASETS:
        return SHIPPED_DATASETS[name]
    # Accept the file name too ("complaints.csv"), which is what a user sees in the folder.
    for dataset in SHIPPED_DATASETS.values():
        if dataset.file_name == name:
            return dataset
    available = ", ".join(f"{key!r} ({dataset.file_name})" for key, dataset in SHIPPED_DATASETS.items())
    raise ValueError(f"Unknown shipped dataset {name!r}: expected one of {available}. Fix: pass one of those names.")


def shipped_dataset_path(name: str) -> pathlib.Path:
    """The path of a dataset file shipped inside the package.

    Args:
        name: A key of `SHIPPED_DATASETS` (``"complaints"``, ``"quotes"``, ``"prompts"``) or its file name
            (``"complaints.csv"``).

    Returns:
        The file's path on disk, ready for ``softprompt.data.load_rows``.

    Raises:
        ValueError: ``name`` is not a shipped dataset; the message lists the available names.
        FileNotFoundError: The package was installed without its data files (or zipped).
    """
    dataset = shipped_dataset(name)
    resource = resources.files("softprompt").joinpath("data", dataset.file_name)
    path = pathlib.Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(
            f"The shipped dataset {name!r} was expected at {str(path)!r} but that file does not exist. "
            "Fix: reinstall softprompt from a full checkout (`pip install -e .`) so softprompt/data/ is present."
        )
    return path


# --- Tokenizer and model ----------------------------------------------------------------------------------------

# The recipes' fixed strings, so their pieces get merged tokens even though they never appear in the rows.
_RECIPE_STRINGS = (
    f"{_COMPLAINTS_TEXT_COLUMN} : ",
    " Label : ",
    COMPLAINT_LABEL,
    NO_COMPLAINT_LABEL,
    "quote : ",
    "prompt : ",
)


def shipped_rows(name: str) -> list[dict[str, str]]:
    """The rows of a shipped dataset file, read with the standard library (the files are CSV and JSON lines)."""
    path = shipped_dataset_path(name)
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _tokenizer_training_corpus() -> list[str]:
    corpus = list(_RECIPE_STRINGS)
    for name, dataset in SHIPPED_DATASETS.items():
        for row in shipped_rows(name):
            if dataset.label_column is None:
                corpus.append(row[dataset.text_column])
            else:
                # The classification recipe's exact layout, so "Tweet text : " and " Label : " become few tokens.
                corpus.append(
                    f"{dataset.text_column} : {row[dataset.text_column]} Label : {row[dataset.label_column]}"
                )
    return corpus


def build_tokenizer(
    padding_side: Literal["left", "right"] = "left", vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Builds a small byte-level BPE tokenizer with BLOOM's special-token layout, in memory.

    The BPE merges are learned from the shipped datasets' text (read from the package's files) and the recipes'
    fixed strings; the 256 byte symbols are always in the vocabulary, so any text encodes and decodes back
    exactly. Special tokens take ids 0..3 (``<unk>``, ``<s>``, ``</s>``, ``<pad>``), and like BLOOM's tokenizer
    ``tokenizer(text)`` adds no special tokens. The result is the same on every call.

    Args:
        padding_side: Side ``tokenizer.pad`` pads on; ``"left"`` like the seed recipes (decoder-only models
            generate after the last real token).
        vocab_size: Upper bound on the vocabulary size (special tokens and byte symbols included).

    Returns:
        The tokenizer; ``len(tokenizer)`` is its vocabulary size.

    Raises:
        ValueError: ``padding_side`` is not ``"left"``/``"right"``, or ``vocab_size`` leaves no room for the
            260 special and byte symbols.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'. Fix: pass one of those.")
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(SPECIAL_TOKENS) + len(byte_alphabet)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size!r}: expected an int of at least {minimum} (4 special tokens + 256 bytes). "
            f"Fix: pass e.g. vocab_size={DEFAULT_VOCAB_SIZE}."
        )
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side=padding_side,
        model_max_length=2048,
    )


def build_tiny_bloom(
    vocab_size: int,
    hidden_size: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> BloomForCausalLM:
    """Builds a small `BloomForCausalLM` with random weights drawn from a fixed seed.

    The global torch random state is left as it was. Word embeddings and the LM head are tied, as in BLOOM.

    Args:
        vocab_size: V, rows of the embedding matrix; at least ``len(tokenizer)``.
        hidden_size: C; a multiple of ``n_head``.
        n_layer: L, number of transformer blocks.
        n_head: H, number of attention heads.
        seed: Seed of the weight initialization.
        initializer_range: Standard deviation of the random weights (BLOOM's default 0.02). With 0.02 a model this
            small gives near-uniform next-token distributions that no soft prompt can move; about 0.3 gives it
            enough signal for a soft prompt to learn within seconds (the embedded default training run uses that).

    Returns:
        The model, in eval mode, on CPU, in float32.

    Raises:
        ValueError: A size is not a positive int, ``vocab_size`` cannot hold the 4 special ids, or
            ``hidden_size`` is not a multiple of ``n_head``.
    """
    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("n_layer", n_layer),
                        ("n_head", n_head)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r}: expected a positive int. Fix: pass e.g. {name}=4.")
    if vocab_size < len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size}: expected at least {len(SPECIAL_TOKENS)} to hold the special ids 0..3. "
            "Fix: pass len(tokenizer)."
        )
    if hidden_size % n_head != 0:
        raise ValueError(
            f"hidden_size={hidden_size} with n_head={n_head}: expected hidden_size to be a multiple of n_head "
            f"(head dim D = C / H). Fix: pass e.g. hidden_size={n_head * max(1, hidden_size // n_head)}."
        )
    if isinstance(initializer_range, bool) or not isinstance(initializer_range, (int, float)) or not (
        0 < initializer_range < float("inf")
    ):
        raise ValueError(
            f"initializer_range={initializer_range!r}: expected a positive finite float. Fix: pass e.g. 0.02."
        )
    config = BloomConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=True,
        initializer_range=float(initializer_range),
    )
    # fork_rng keeps the caller's random stream untouched while making the weights depend only on `seed`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BloomForCausalLM(config)
    return model.eval()


def build_tiny_model(model_type: str, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A tiny random model of a supported family (its `Family.tiny_config`), weights drawn from a fixed seed.

    The global torch random state is left as it was.

    Args:
        model_type: a supported transformers ``model_type`` (``llama``, ``gpt2``, ...; see
            `softprompt.supported_model_types`).
        vocab_size: V, at least ``len(tokenizer)``.
        seed: seed of the weight initialization.

    Returns:
        The model, in eval mode, on CPU, in float32.

    Raises:
        UnsupportedModelError: `model_type` is not supported.
    """
    config = family_named(model_type).tiny_config(vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def save_tiny_model(
    directory: str | os.PathLike[str],
    *,
    model_type: str = "bloom",
    tokenizer: PreTrainedTokenizerFast | None = None,
    model: PreTrainedModel | None = None,
    seed: int = 0,
) -> pathlib.Path:
    """Writes a tiny checkpoint (model + tokenizer) loadable by the ``from_pretrained`` code paths.

    Args:
        directory: Folder to write into; created if missing.
        model_type: the family of the model to build when `model` is None (`build_tiny_model`).
        tokenizer: The tokenizer to save; `build_tokenizer()` when None.
        model: The model to save; `build_tiny_model` of `model_type` with ``len(tokenizer)`` rows when None.
        seed: Seed of the weights when ``model`` is None.

    Returns:
        The folder, for ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    Raises:
        ValueError: The model's vocabulary is smaller than the tokenizer's.
    """
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    model = build_tiny_model(model_type, len(tokenizer), seed=seed) if model is None else model
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"model.config.vocab_size={model.config.vocab_size} is smaller than len(tokenizer)={len(tokenizer)}: "
            "some token ids would have no embedding row. Fix: build the model with vocab_size=len(tokenizer)."
        )
    folder = pathlib.Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    # Written beside the folder first, then each file renamed into place: a crash leaves no half-written file.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for written in sorted(pathlib.Path(staging).iterdir()):
            os.replace(written, folder / written.name)
    return folder


def save_tiny_bloom(
    directory: str | os.PathLike[str],
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    model: BloomForCausalLM | None = None,
    seed: int = 0,
) -> pathlib.Path:
    """`save_tiny_model` of a tiny BLOOM, by default `build_tiny_bloom`'s (the embedded default base's shape)."""
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    model = build_tiny_bloom(len(tokenizer), seed=seed) if model is None else model
    return save_tiny_model(directory, model_type="bloom", tokenizer=tokenizer, model=model)
