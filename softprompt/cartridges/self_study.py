"""Self-study: conversations about a document, written by the frozen model itself with the document in context.

Eyuboglu et al. (arXiv 2506.06266) train a cartridge on synthetic conversations rather than on the document's text:
the model, shown one chunk of the document, is given a *seed prompt* that asks it to ask something about the
chunk; its question is then answered by the model, again with the chunk in context. The conversations cover what a
user might ask, in the form questions and answers take, and the teacher (the model with the whole document in
context) scores every position of them (`softprompt.cartridges.teacher`).

Here both turns are generated with the library's own `SoftPromptModel.generate`, in batches: each chunk is held as
a cartridge of its own prefill (every position, frozen), so a batch mixes chunks row by row (``adapter_names``) and
no row prefills its chunk again. Questions are sampled (temperature 0.8) for variety, answers at temperature 0.3;
the sampling is seeded and does not touch the caller's random state.

Questions can also come from a file (`read_queries`); they are then answered with the whole document in context.
Conversations are written to and read from JSON lines (`write_conversations`, `read_conversations`), so that a run
can be repeated without generating them again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt.cartridges.chat import ChatFormat
from softprompt.cartridges.teacher import document_cache
from softprompt.data import DataError, collate
from softprompt.files import atomic_write_bytes
from softprompt.model import SoftPromptModel

SEED_PROMPTS: tuple[str, ...] = (
    "Ask one question about a specific fact stated in the document above. Write only the question.",
    "Ask a question whose answer needs two details of the document above. Write only the question.",
    "Ask for a short summary of one part of the document above. Write only the request.",
    "Ask how to do something that the document above explains, as a user would. Write only the question.",
    "Ask about a name, a number or a command that appears in the document above. Write only the question.",
)
"""The seed prompts, one per kind of request the paper's self-study uses (fact, synthesis, summary, use, detail),
in our own words; conversation i uses seed prompt i mod 5."""

MAX_QUESTION_TOKENS = 64
"""Most new tokens of a generated question."""
QUESTION_SAMPLING = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}
ANSWER_SAMPLING = {"do_sample": True, "temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1}


@dataclass
class Conversation:
    """One question about the document and its answer."""

    question: str
    answer: str
    chunk: int | None = None
    """The chunk of the document the model saw (self-study), or None (a question from a file)."""
    seed_prompt: int | None = None
    """Which of `SEED_PROMPTS` asked for the question, or None."""


def document_chunks(tokenizer: Any, document: str, chunk_tokens: int) -> list[str]:
    """The document cut into consecutive pieces of at most `chunk_tokens` tokens (decoded back to text)."""
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[start : start + chunk_tokens]) for start in range(0, len(ids), chunk_tokens)]


def generate_replies(
    model: SoftPromptModel, chat: ChatFormat, requests: Sequence[tuple[str, str]], max_new_tokens: int,
    sampling: dict[str, Any], batch_size: int,
) -> list[str]:
    """The model's reply to each user message, with the context adapter the request names in front.

    Args:
        model: holds every context named in `requests` as an adapter.
        chat: the token layout.
        requests: (context adapter, user message) pairs.
        max_new_tokens: the reply's most tokens.
        sampling: generate's decoding options.
        batch_size: requests per generate call.

    Returns:
        Each reply's text, special tokens dropped, stripped.
    """
    tokenizer = chat.tokenizer
    eos = model.base_model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.base_model.get_input_embeddings().weight.device
    replies: list[str] = []
    for start in range(0, len(requests), batch_size):
        part = requests[start : start + batch_size]
        batch = collate([{"input_ids": chat.prompt_ids(message)} for _, message in part], pad_token_id=pad,
                        padding_side="left")
        output = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                adapter_names=[name for name, _ in part], max_new_tokens=max_new_tokens,
                                eos_token_id=eos, pad_token_id=pad, **sampling)
        new = output[:, batch["input_ids"].shape[1]:]
        replies += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return replies


def _context_model(base_model: Any, contexts: dict[str, list[int]]) -> SoftPromptModel:
    """A model holding each context's own cache as an adapter of that name."""
    model = None
    for name, ids in contexts.items():
        config, module = document_cache(base_model, ids)
        if model is None:
            model = SoftPromptModel.from_module(base_model, config, module, adapter_name=name)
        else:
            model.add_adapter(name, config, module=module)
    assert model is not None
    return model


def self_study(
    base_model: Any, chat: ChatFormat, document: str, num_conversations: int, chunk_tokens: int,
    max_answer_tokens: int, batch_size: int, seed: int,
) -> list[Conversation]:
    """Generates `num_conversations` conversations about `document` (module docstring).

    Conversation i sees chunk i mod (number of chunks) and seed prompt i mod 5; empty questions are dropped.

    Raises:
        DataError: the model asked nothing at all (every question came back empty).
    """
    chunks = document_chunks(chat.tokenizer, document, chunk_tokens)
    model = _context_model(base_model, {f"chunk-{index}": chat.context_ids(chunk) for index, chunk in enumerate(chunks)})
    plan = [(index % len(chunks), index % len(SEED_PROMPTS)) for index in range(num_conversations)]
    with _seeded(seed, model):
        questions = generate_replies(model, chat, [(f"chunk-{c}", SEED_PROMPTS[s]) for c, s in plan],
                                     MAX_QUESTION_TOKENS, QUESTION_SAMPLING, batch_size)
        asked = [(plan_row, question) for plan_row, question in zip(plan, questions) if question]
        if not asked:
            raise DataError(
                f"Self-study: the model wrote {len(questions)} empty questions about the corpus. Fix: pass questions "
                "in a file (--queries FILE), or use an instruction-tuned base model."
            )
        answers = generate_replies(model, chat, [(f"chunk-{c}", question) for (c, _), question in asked],
                                   max_answer_tokens, ANSWER_SAMPLING, batch_size)
    return [Conversation(question, answer, c, s) for ((c, s), question), answer in zip(asked, answers)]


def answer_queries(
    base_model: Any, chat: ChatFormat, document: str, questions: Sequence[str], max_answer_tokens: int,
    batch_size: int, seed: int,
) -> list[Conversation]:
    """Each question answered by the model with the whole document in context."""
    model = _context_model(base_model, {"document": chat.context_ids(document)})
    with _seeded(seed, model):
        answers = generate_replies(model, chat, [("document", question) for question in questions],
                                   max_answer_tokens, ANSWER_SAMPLING, batch_size)
    return [Conversation(question, answer) for question, answer in zip(questions, answers)]


@contextmanager
def _seeded(seed: int, model: SoftPromptModel) -> Iterator[None]:
    """Seeds torch's generators for the block and puts the caller's random state back after it."""
    device = model.base_model.get_input_embeddings().weight.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def read_queries(path: Path) -> list[tuple[str, str | None]]:
    """Questions from a file: one per non-empty line (any text file), or JSON lines (``.jsonl``) with ``question`` and
    optionally ``answer``.

    Raises:
        DataError: a missing or empty file, or a JSON line without a non-empty ``question`` string.
    """
    if not path.is_file():
        raise DataError(f"queries={str(path)!r}: file not found. Fix: pass a file of questions, or 'self-study'.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        queries: list[tuple[str, str | None]] = [(line.strip(), None) for line in lines]
    else:
        queries = []
        for number, line in enumerate(lines, 1):
            row = json.loads(line)
            question, answer = row.get("question") if isinstance(row, dict) else None, None
            if isinstance(row, dict) and isinstance(row.get("answer"), str):
                answer = row["answer"]
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"{path}, line {number}: expected a JSON object with a non-empty 'question' string. "
                                "Fix: write one {\"question\": ..., \"answer\": ...} object per line.")
            queries.append((question.strip(), answer))
    if not queries:
        raise DataError(f"queries={str(path)!r}: the file holds no question. Fix: write one question per line.")
    return queries


def write_conversations(path: Path, conversations: Sequence[Conversation]) -> None:
    """Writes one JSON object per line (``question``, ``answer``, ``chunk``, ``seed_prompt``), atomically."""
    text = "".join(json.dumps(asdict(conversation), ensure_ascii=False) + "\n" for conversation in conversations)
    atomic_write_bytes(path, text.encode("utf-8"))


def read_conversations(path: Path) -> list[Conversation]:
    """Reads what `write_conversations` wrote."""
    return [Conversation(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]
