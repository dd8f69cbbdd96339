"""Offline assets for the embedded default run: a tiny tokenizer, a tiny random BLOOM and small datasets.

Everything here is built in memory and deterministically, without the network, so that the default run, the
examples and the tests work on a machine that cannot reach the Hugging Face Hub:

- `build_tokenizer`: a byte-level BPE tokenizer (so any text encodes, nothing maps to ``<unk>``) trained on the
  text of the shipped datasets, with BLOOM's special-token layout (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
  ``<pad>`` 3) and, like BLOOM's tokenizer, no special tokens added by ``tokenizer(text)``.
- `build_tiny_bloom`: a `BloomForCausalLM` with random, seeded weights, about 12 C^2 parameters per layer (50k
  at the default C = 64).
- `save_tiny_bloom`: writes both with ``save_pretrained`` so ``AutoModelForCausalLM.from_pretrained(path)`` and
  ``AutoTokenizer.from_pretrained(path)`` load them like any checkpoint.
- Three synthetic datasets shipped under ``softprompt/data/`` (`SHIPPED_DATASETS`, `shipped_dataset_path`):
  ``complaints`` (classification in the spirit of RAFT twitter_complaints), ``quotes`` and ``prompts`` (plain
  text for the causal-LM recipe, in the spirit of english_quotes and awesome-chatgpt-prompts). Each file is the
  exact output of its ``generate_*`` function with the default row count and seed; `render_shipped_dataset`
  gives the file's text and `write_shipped_datasets` rewrites the files after a generator changes.

Shapes: V vocabulary size, C hidden size, L layers, H heads.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BloomConfig, BloomForCausalLM, PreTrainedTokenizerFast

from softprompt.files import atomic_write_bytes

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


# --- Synthetic datasets -----------------------------------------------------------------------------------------

_BRANDS = (
    "SkyJet", "AeroLink", "BlueWing", "RailOne", "MetroBus", "FastFiber", "CellCo", "NetWave", "PowerGrid",
    "BankNorth", "ShopMart", "QuickCart", "PizzaPlace", "CoffeeCorner", "StreamBox", "GameHub",
)
_ITEMS = (
    "order", "package", "flight", "bag", "phone", "laptop", "router", "bill", "ticket", "delivery", "account",
    "card", "subscription", "pizza", "headphones",
)
_PROBLEMS = (
    "arrived broken", "never arrived", "was cancelled", "is still missing", "got lost", "was delayed",
    "stopped working", "was charged twice", "showed up damaged", "is stuck in processing",
)
_FRUSTRATIONS = (
    "This is ridiculous.", "So frustrated.", "Worst service ever.", "Never again.", "Fix this now.",
    "Unacceptable.", "I want a refund.", "Really disappointed.", "Absolutely terrible.", "Why is this so hard?",
)
_WAITS = ("two hours", "three days", "a week", "45 minutes", "two weeks", "a month", "all morning")
_SERVICES = ("app", "website", "internet", "wifi", "checkout", "login page", "customer line", "signal")
_PRAISES = (
    "you made my day", "great job", "much appreciated", "keep it up", "you guys rock", "so helpful",
    "love it", "thank you so much", "brilliant work", "what a team",
)
_GOOD_THINGS = (
    "quick reply", "upgrade", "smooth flight", "fast delivery", "friendly staff", "free coffee", "new menu",
    "great playlist", "kind help", "birthday discount",
)
_DAYS = ("today", "tomorrow", "on Sunday", "this weekend", "tonight", "on Friday", "next week")
_PLACES = ("store", "lounge", "branch", "cafe", "station", "help desk")
_HASHTAGS = ("weekend", "travel", "coffee", "music", "goodvibes", "friday", "sunday", "news")
_TOPICS = ("new album", "big game", "season finale", "street festival", "movie night", "book club")

_COMPLAINT_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    lambda rng: f"@{rng.choice(_BRANDS)} my {rng.choice(_ITEMS)} {rng.choice(_PROBLEMS)}. {rng.choice(_FRUSTRATIONS)}",
    lambda rng: f"@{rng.choice(_BRANDS)} {rng.choice(_WAITS)} on hold and still no answer. {rng.choice(_FRUSTRATIONS)}",
    lambda rng: f"Still waiting on a refund from @{rng.choice(_BRANDS)} after {rng.choice(_WAITS)}. "
    f"{rng.choice(_FRUSTRATIONS)}",
    lambda rng: f"@{rng.choice(_BRANDS)} why is your {rng.choice(_SERVICES)} down again? {rng.choice(_FRUSTRATIONS)}",
    lambda rng: f"Worst experience ever with @{rng.choice(_BRANDS)}, my {rng.choice(_ITEMS)} "
    f"{rng.choice(_PROBLEMS)}.",
    lambda rng: f"@{rng.choice(_BRANDS)} you charged me twice for my {rng.choice(_ITEMS)} and nobody replies. "
    f"{rng.choice(_FRUSTRATIONS)}",
)
_NO_COMPLAINT_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    lambda rng: f"@{rng.choice(_BRANDS)} thanks for the {rng.choice(_GOOD_THINGS)}, {rng.choice(_PRAISES)}!",
    lambda rng: f"Loving my new {rng.choice(_ITEMS)} from @{rng.choice(_BRANDS)}, {rng.choice(_PRAISES)}",
    lambda rng: f"@{rng.choice(_BRANDS)} what time does the {rng.choice(_PLACES)} open {rng.choice(_DAYS)}?",
    lambda rng: f"Just got my {rng.choice(_ITEMS)} from @{rng.choice(_BRANDS)} {rng.choice(_DAYS)}, "
    f"{rng.choice(_PRAISES)}.",
    lambda rng: f"Anyone going to the {rng.choice(_TOPICS)} {rng.choice(_DAYS)}? #{rng.choice(_HASHTAGS)}",
    lambda rng: f"@{rng.choice(_BRANDS)} great service {rng.choice(_DAYS)}, {rng.choice(_PRAISES)}",
)

_VIRTUES = (
    "Patience", "Courage", "Kindness", "Curiosity", "Honesty", "Discipline", "Gratitude", "Humility", "Hope",
    "Silence", "Laughter", "Friendship", "Practice", "Wisdom", "Love", "Change",
)
_QUOTE_OBJECTS = (
    "the quiet engine of every long journey", "a door that only opens from the inside",
    "the bridge between who you are and who you could be", "a light you carry for others",
    "the root of every good harvest", "a habit before it is a gift", "the compass of an honest heart",
    "a song the tired world still remembers", "the first step of every great story",
    "the soil in which courage grows", "a promise you keep to yourself", "the map drawn by those who got lost",
)
_QUOTE_VERBS = ("begins", "grows", "lives", "ends", "shines", "waits", "starts")
_QUOTE_PLACES = (
    "where fear stops talking", "in the smallest choices", "when nobody is watching", "at the edge of comfort",
    "in the space between two breaths", "after the storm has passed", "in the hands of the patient",
)
_QUOTE_ACTIONS = (
    "Be kind", "Keep walking", "Stay curious", "Speak softly", "Dream boldly", "Listen first", "Start small",
    "Forgive quickly", "Work quietly", "Laugh often",
)
_QUOTE_REASONS = (
    "the road remembers every step", "tomorrow is built from today", "small things become large things",
    "every storm runs out of rain", "the world is wider than your worries", "nobody else can be you",
)
_QUOTE_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    lambda rng: f"{rng.choice(_VIRTUES)} is {rng.choice(_QUOTE_OBJECTS)}.",
    lambda rng: f"{rng.choice(_VIRTUES)} {rng.choice(_QUOTE_VERBS)} {rng.choice(_QUOTE_PLACES)}.",
    lambda rng: f"{rng.choice(_QUOTE_ACTIONS)}, because {rng.choice(_QUOTE_REASONS)}.",
    lambda rng: f"Without {rng.choice(_VIRTUES).lower()}, {rng.choice(_VIRTUES).lower()} is only a word.",
)

_ROLES = (
    "travel guide", "math teacher", "storyteller", "poet", "career coach", "chef", "personal trainer",
    "translator", "historian", "librarian", "gardener", "tour guide", "debate coach", "film critic",
    "motivational speaker", "plant doctor", "chess tutor", "music teacher",
)
_ROLE_TASKS = (
    "answer my questions in simple words", "give me three practical suggestions", "explain things step by step",
    "keep every answer under five sentences", "ask me one question before you answer",
    "use friendly and encouraging language", "give one short example for every idea",
)
_REQUESTS = (
    "I am visiting a new city this weekend.", "I want to learn something new every day.",
    "I have a small garden and very little time.", "I need to prepare for an interview.",
    "I would like to write a short poem about the sea.", "I want to cook dinner for four friends.",
    "I am learning to play the piano.", "I need a plan for a calm morning routine.",
    "I want to understand why the sky is blue.", "I am reading my first history book.",
)
_PROMPT_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    lambda rng: f"I want you to act as a {rng.choice(_ROLES)}. Please {rng.choice(_ROLE_TASKS)}. "
    f"My first request is: {rng.choice(_REQUESTS)}",
    lambda rng: f"Act as a {rng.choice(_ROLES)} and {rng.choice(_ROLE_TASKS)}. {rng.choice(_REQUESTS)}",
    lambda rng: f"You are a {rng.choice(_ROLES)}. {rng.choice(_REQUESTS)} Please {rng.choice(_ROLE_TASKS)}.",
)


_MAX_CONSECUTIVE_DUPLICATES = 10_000
"""Draws in a row that only repeat earlier texts before a generator concludes its templates are exhausted."""


def _check_generator_arguments(num_rows: int, seed: int) -> None:
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows <= 0:
        raise ValueError(f"num_rows={num_rows!r}: expected a positive int. Fix: pass e.g. num_rows=300.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: expected an int. Fix: pass e.g. seed=0.")


def _distinct_texts(
    rng: random.Random, templates: tuple[Callable[[random.Random], str], ...], count: int, seen: set[str]
) -> Iterator[str]:
    """Yields ``count`` texts from ``templates`` that are not in ``seen`` (and adds them to it)."""
    produced = 0
    duplicates_in_a_row = 0
    while produced < count:
        text = rng.choice(templates)(rng)
        if text in seen:
            duplicates_in_a_row += 1
            if duplicates_in_a_row >= _MAX_CONSECUTIVE_DUPLICATES:
                raise ValueError(
                    f"Asked for {count} distinct texts but the templates ran out after {produced}. "
                    "Fix: ask for fewer rows."
                )
            continue
        duplicates_in_a_row = 0
        seen.add(text)
        produced += 1
        yield text


def generate_complaints(num_rows: int = COMPLAINTS_NUM_ROWS, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """Generates the synthetic tweet-complaint classification dataset.

    Complaints name a failure (a broken order, a refund, hours on hold) and end in frustration; the other tweets
    thank, praise or ask a neutral question, so a model can learn the split from a handful of cue words. About
    half the rows are complaints; no tweet text repeats.

    Args:
        num_rows: Number of rows to generate.
        seed: Seed of the private random generator (the global ``random`` state is not touched).

    Returns:
        Rows ``{"Tweet text": str, "text_label": "complaint" | "no complaint"}`` in a shuffled order.

    Raises:
        ValueError: ``num_rows`` is not a positive int or is more than the templates can make distinct, or
            ``seed`` is not an int.
    """
    _check_generator_arguments(num_rows, seed)
    rng = random.Random(seed)
    num_complaints = num_rows // 2
    seen: set[str] = set()
    rows = [
        {_COMPLAINTS_TEXT_COLUMN: text, _COMPLAINTS_LABEL_COLUMN: COMPLAINT_LABEL}
        for text in _distinct_texts(rng, _COMPLAINT_TEMPLATES, num_complaints, seen)
    ]
    rows += [
        {_COMPLAINTS_TEXT_COLUMN: text, _COMPLAINTS_LABEL_COLUMN: NO_COMPLAINT_LABEL}
        for text in _distinct_texts(rng, _NO_COMPLAINT_TEMPLATES, num_rows - num_complaints, seen)
    ]
    rng.shuffle(rows)
    return rows


def generate_quotes(num_rows: int = QUOTES_NUM_ROWS, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """Generates short synthetic quotes, one sentence each, no two alike.

    Args:
        num_rows: Number of rows to generate.
        seed: Seed of the private random generator.

    Returns:
        Rows ``{"quote": str}``.

    Raises:
        ValueError: ``num_rows`` is not a positive int or is more than the templates can make distinct, or
            ``seed`` is not an int.
    """
    _check_generator_arguments(num_rows, seed)
    rng = random.Random(seed)
    return [{"quote": text} for text in _distinct_texts(rng, _QUOTE_TEMPLATES, num_rows, set())]


def generate_prompts(num_rows: int = PROMPTS_NUM_ROWS, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """Generates synthetic "act as a ..." instructions, no two alike.

    Args:
        num_rows: Number of rows to generate.
        seed: Seed of the private random generator.

    Returns:
        Rows ``{"prompt": str}``.

    Raises:
        ValueError: ``num_rows`` is not a positive int or is more than the templates can make distinct, or
            ``seed`` is not an int.
    """
    _check_generator_arguments(num_rows, seed)
    rng = random.Random(seed)
    return [{"prompt": text} for text in _distinct_texts(rng, _PROMPT_TEMPLATES, num_rows, set())]


_GENERATORS: dict[str, Callable[[int, int], list[dict[str, str]]]] = {
    "complaints": generate_complaints,
    "quotes": generate_quotes,
    "prompts": generate_prompts,
}


def _shipped_dataset(name: str) -> ShippedDataset:
    if name in SHIPPED_DATASETS:
        return SHIPPED_DATASETS[name]
    # Accept the file name too ("complaints.csv"), which is what a user sees in the folder.
    for dataset in SHIPPED_DATASETS.values():
        if dataset.file_name == name:
            return dataset
    available = ", ".join(f"{key!r} ({dataset.file_name})" for key, dataset in SHIPPED_DATASETS.items())
    raise ValueError(f"Unknown shipped dataset {name!r}: expected one of {available}. Fix: pass one of those names.")


def generate_shipped_rows(name: str) -> list[dict[str, str]]:
    """Regenerates the rows of a shipped dataset with the row count and seed its file was written with.

    Args:
        name: A key of `SHIPPED_DATASETS` (``"complaints"``, ``"quotes"``, ``"prompts"``) or its file name.

    Returns:
        The rows, equal to the rows of the committed file.

    Raises:
        ValueError: ``name`` is not a shipped dataset.
    """
    dataset = _shipped_dataset(name)
    key = next(key for key, value in SHIPPED_DATASETS.items() if value is dataset)
    return _GENERATORS[key](dataset.num_rows, dataset.seed)


def render_shipped_dataset(name: str) -> str:
    """The exact text of a shipped dataset file, rendered from its generator.

    CSV files are written by `csv.DictWriter` with ``\\n`` line endings; JSONL files hold one compact JSON
    object per line.

    Args:
        name: A key of `SHIPPED_DATASETS` or its file name.

    Returns:
        The file's text.

    Raises:
        ValueError: ``name`` is not a shipped dataset.
    """
    dataset = _shipped_dataset(name)
    rows = generate_shipped_rows(name)
    if dataset.file_name.endswith(".csv"):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_shipped_datasets(directory: str | os.PathLike[str]) -> list[pathlib.Path]:
    """Writes every shipped dataset file into ``directory`` (``softprompt/data`` to refresh the committed ones).

    Args:
        directory: An existing folder.

    Returns:
        The paths written.

    Raises:
        NotADirectoryError: ``directory`` is not an existing folder.
    """
    folder = pathlib.Path(directory)
    if not folder.is_dir():
        raise NotADirectoryError(f"directory={str(folder)!r} is not an existing folder. Fix: create it first.")
    written = []
    for name, dataset in SHIPPED_DATASETS.items():
        path = folder / dataset.file_name
        atomic_write_bytes(path, render_shipped_dataset(name).encode("utf-8"))
        written.append(path)
    return written


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
    dataset = _shipped_dataset(name)
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


def _tokenizer_training_corpus() -> list[str]:
    corpus = list(_RECIPE_STRINGS)
    for name, dataset in SHIPPED_DATASETS.items():
        for row in generate_shipped_rows(name):
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

    The BPE merges are learned from the shipped datasets' text (regenerated, not read from disk) and the recipes'
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


def save_tiny_bloom(
    directory: str | os.PathLike[str],
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    model: BloomForCausalLM | None = None,
    seed: int = 0,
) -> pathlib.Path:
    """Writes a tiny BLOOM checkpoint (model + tokenizer) loadable by the ``from_pretrained`` code paths.

    Args:
        directory: Folder to write into; created if missing.
        tokenizer: The tokenizer to save; `build_tokenizer()` when None.
        model: The model to save; ``build_tiny_bloom(len(tokenizer), seed=seed)`` when None.
        seed: Seed of the weights when ``model`` is None.

    Returns:
        The folder, for ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    Raises:
        ValueError: The model's vocabulary is smaller than the tokenizer's.
    """
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    model = build_tiny_bloom(len(tokenizer), seed=seed) if model is None else model
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
