"""Rebuilds the datasets shipped in ``softprompt/data/`` from their generators (the library never needs this).

Each shipped file is the exact output of its ``generate_*`` function with the row count and seed its
`softprompt.quickstart.ShippedDataset` records; ``tests/test_data.py`` checks that the committed files equal what
this script renders. After changing a generator, rewrite the files with::

    python scripts/shipped_data.py
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import random
import sys
from collections.abc import Callable, Iterator

from softprompt.files import atomic_write_bytes
from softprompt.quickstart import (
    COMPLAINT_LABEL,
    COMPLAINTS_NUM_ROWS,
    DEFAULT_SEED,
    NO_COMPLAINT_LABEL,
    PROMPTS_NUM_ROWS,
    QUOTES_NUM_ROWS,
    SHIPPED_DATASETS,
    shipped_dataset,
)

_COMPLAINTS_TEXT_COLUMN = SHIPPED_DATASETS["complaints"].text_column
_COMPLAINTS_LABEL_COLUMN = SHIPPED_DATASETS["complaints"].label_column


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


def generate_shipped_rows(name: str) -> list[dict[str, str]]:
    """Regenerates the rows of a shipped dataset with the row count and seed its file was written with.

    Args:
        name: A key of `SHIPPED_DATASETS` (``"complaints"``, ``"quotes"``, ``"prompts"``) or its file name.

    Returns:
        The rows, equal to the rows of the committed file.

    Raises:
        ValueError: ``name`` is not a shipped dataset.
    """
    dataset = shipped_dataset(name)
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
    dataset = shipped_dataset(name)
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




if __name__ == "__main__":
    folder = pathlib.Path(__file__).resolve().parents[1] / "softprompt" / "data"
    for written in write_shipped_datasets(folder):
        print(f"wrote {written}")
    sys.exit(0)
