"""What a cartridge buys, measured: on held-out questions about the document, how likely the reference answers are
(and what the model answers greedily) with the cartridge in front, with the whole document in front, and with
nothing; the cartridge's key/value memory against the document's; and how fast the model answers with each.

Every context is followed by the same conversation ids (`softprompt.cartridges.chat.ChatFormat`), so only the
context differs. "The document in front" is the document's own cache (`softprompt.cartridges.teacher.document_cache`),
which is the document in context exactly; for speed it is measured both ways a server could hold it: as a cache
prefilled once, and as text in every prompt (prefilled with each request).

Shapes: P cartridge positions, D document tokens, L layers, K key/value heads, D_h head dim.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt.cartridges.chat import ChatFormat
from softprompt.cartridges.self_study import generate_replies
from softprompt.cartridges.teacher import DOCUMENT_ADAPTER, document_cache
from softprompt.data import DataError, collate
from softprompt.loss import IGNORE_INDEX
from softprompt.model import SoftPromptModel

CARTRIDGE_ADAPTER = "cartridge"
CONTEXTS = {"cartridge": CARTRIDGE_ADAPTER, "document": DOCUMENT_ADAPTER, "none": None}
"""The three contexts compared, and the adapter each one is."""


@dataclass(frozen=True)
class QuestionAnswer:
    """A held-out question about the document and its reference answer."""

    question: str
    answer: str


def read_questions(path: str | Path) -> list[QuestionAnswer]:
    """JSON lines with ``question`` and ``answer`` strings.

    Raises:
        DataError: a missing file, or a line without both strings.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found. Fix: pass a JSON-lines file of {{question, answer}} objects.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
            raise DataError(f"{path}, line {number}: expected {{\"question\": ..., \"answer\": ...}} with two strings.")
        rows.append(QuestionAnswer(row["question"], row["answer"]))
    return rows


@torch.no_grad()
def answer_log_likelihoods(
    model: SoftPromptModel, chat: ChatFormat, questions: Sequence[QuestionAnswer], adapter_name: str | None
) -> list[tuple[float, int]]:
    """Each reference answer's log-likelihood after its question (the answer's tokens and the end of its turn),
    with `adapter_name` in front (None: nothing), and its token count."""
    device = model.base_model.get_input_embeddings().weight.device
    results = []
    for item in questions:
        prompt, answer = chat.prompt_ids(item.question), chat.answer_ids(item.question, item.answer)
        input_ids = torch.tensor([prompt + answer], device=device)
        labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + answer], device=device)
        total, counts = model.summed_loss(input_ids, None, labels, [adapter_name])
        results.append((-float(total), int(counts.sum())))
    return results


@torch.no_grad()
def generation_seconds(
    model: SoftPromptModel, chat: ChatFormat, questions: Sequence[QuestionAnswer],
    contexts: dict[str, tuple[str | None, Sequence[int]]], new_tokens: int, repeats: int,
) -> dict[str, list[float]]:
    """Wall times of greedily generating `new_tokens` tokens for every question at once (one left-padded batch,
    exactly `new_tokens` each: no EOS), per context, after one warm-up call of each.

    Args:
        contexts: label -> (adapter in front, ids put in front of every prompt).
        repeats: timed calls per context, alternated (repeat i of every context before repeat i + 1 of any), so
            that a change in the machine's load falls on all of them alike.

    Returns:
        Each context's `repeats` times, in seconds.
    """
    device = model.base_model.get_input_embeddings().weight.device
    pad = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else chat.tokenizer.eos_token_id
    calls = {}
    for label, (adapter, context_ids) in contexts.items():
        batch = collate([{"input_ids": list(context_ids) + chat.prompt_ids(item.question)} for item in questions],
                        pad_token_id=pad, padding_side="left")
        calls[label] = (batch["input_ids"].to(device), batch["attention_mask"].to(device),
                        {"adapter_names": [adapter] * len(questions), "max_new_tokens": new_tokens,
                         "do_sample": False, "eos_token_id": None, "pad_token_id": pad})
    times: dict[str, list[float]] = {label: [] for label in contexts}
    for repeat in range(repeats + 1):
        for label, (input_ids, mask, options) in calls.items():
            started = time.perf_counter()
            model.generate(input_ids, mask, **options)
            if repeat:  # the first round warms up
                times[label].append(time.perf_counter() - started)
    return times


def evaluate_cartridge(
    model: SoftPromptModel, tokenizer: Any, document: str, questions: Sequence[QuestionAnswer],
    adapter_name: str | None = None, max_new_tokens: int = 48, speed_tokens: int = 32, speed_questions: int = 4,
    repeats: int = 3,
) -> dict[str, Any]:
    """Compares the cartridge with the document in context and with nothing (module docstring).

    Args:
        model: holds the trained cartridge (or plain prefix) as `adapter_name` (None: the active adapter).
        tokenizer: the base's tokenizer.
        document: the document the cartridge stands for.
        questions: held-out questions and reference answers.
        max_new_tokens: most tokens of a greedy answer.
        speed_tokens: tokens generated per question when timing.
        speed_questions: the first this many questions form the timed batch.
        repeats: timed calls per context, alternated (the median is reported, every sample kept).

    Returns:
        ``log_likelihood_per_token`` and ``mean_log_likelihood`` (per answer) for each context, ``gap_closed``
        (how much of the way from no context to the document the cartridge goes, in log-likelihood per token),
        ``per_question`` (reference, log-likelihoods, greedy answers), ``memory`` and ``speed``.
    """
    name = adapter_name or model.active_adapter
    chat = ChatFormat(tokenizer)
    context_ids = chat.context_ids(document)
    base = model.base_model
    compared = SoftPromptModel.from_module(base, *document_cache(base, context_ids), adapter_name=DOCUMENT_ADAPTER)
    compared.add_adapter(CARTRIDGE_ADAPTER, model.adapter_configs[name], module=model.prompts[name])

    likelihoods = {label: answer_log_likelihoods(compared, chat, questions, adapter)
                   for label, adapter in CONTEXTS.items()}
    greedy = {label: generate_replies(compared, chat, [(adapter, item.question) for item in questions],
                                      max_new_tokens, {"do_sample": False}, batch_size=len(questions))
              for label, adapter in CONTEXTS.items()}
    tokens = sum(count for _, count in likelihoods["none"])
    per_token = {label: sum(value for value, _ in rows) / tokens for label, rows in likelihoods.items()}
    gap = per_token["document"] - per_token["none"]

    shape, element = compared.shape, base.get_input_embeddings().weight.element_size()
    positions = model.adapter_configs[name].num_virtual_tokens
    memory = {"cartridge_positions": positions, "document_positions": len(context_ids),
              "cartridge_bytes": positions * shape.prefix_width * element,
              "document_bytes": len(context_ids) * shape.prefix_width * element,
              "fraction": positions / len(context_ids)}
    timed = questions[:speed_questions]
    times = generation_seconds(compared, chat, timed, {
        "cartridge": (CARTRIDGE_ADAPTER, ()),
        "document cache (prefilled once)": (DOCUMENT_ADAPTER, ()),
        "document in the prompt": (None, context_ids),
    }, speed_tokens, repeats)
    seconds = {label: statistics.median(values) for label, values in times.items()}
    return {
        "questions": len(questions),
        "answer_tokens": tokens,
        "log_likelihood_per_token": per_token,
        "mean_log_likelihood": {label: sum(v for v, _ in rows) / len(rows) for label, rows in likelihoods.items()},
        "gap_closed": (per_token["cartridge"] - per_token["none"]) / gap if gap else None,
        "per_question": [
            {"question": item.question, "reference": item.answer,
             "log_likelihood": {label: likelihoods[label][index][0] for label in CONTEXTS},
             "greedy": {label: greedy[label][index] for label in CONTEXTS}}
            for index, item in enumerate(questions)
        ],
        "memory": memory,
        "speed": {"batch": len(timed), "new_tokens": speed_tokens, "seconds": seconds, "samples": times,
                  "tokens_per_second": {label: len(timed) * speed_tokens / value
                                        for label, value in seconds.items()}},
    }
