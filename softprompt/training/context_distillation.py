"""The context-distillation recipe (``softprompt train --method cartridge --recipe context-distillation --corpus
FILE``): Cartridges' training as a data recipe of the training loop.

- **Data**: conversations about the corpus: self-study (`softprompt.cartridges.self_study`) or questions from a
  file, each tokenized as what follows a context (`softprompt.cartridges.chat.ChatFormat`), cut to ``max_length``.
- **Targets**: the teacher's k most likely next tokens at every position, the frozen model with the whole corpus in
  context, computed once (`softprompt.cartridges.teacher`).
- **Loss**: the top-k KL of the student (the frozen model with the adapter) against them
  (`softprompt.cartridges.distillation.TopKDistillationLoss`); the training step calls it as it calls the label
  loss of the other recipes.
- **Init**: with ``init_from_corpus`` (the default), the adapter starts as the corpus's first P positions in context:
  the frozen model's own cache of them, its first ``num_frozen_tokens`` frozen (the attention sink).

Everything the recipe makes is written to ``output_dir/data/`` once the run writes: ``conversations.jsonl`` (pass
it as ``--queries`` to repeat a run without generating), ``teacher.safetensors`` and ``manifest.json`` (what they
were made from: the corpus's SHA-256, the settings, the base model; and their own SHA-256). A resumed run, and
``softprompt eval``, read them back rather than generating again, once the manifest shows the same inputs; with the
checkpoint's random states restored, a resumed run continues bit for bit.

Shapes: P adapter positions, N teacher positions, k kept tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from softprompt.cartridges.adapters import load_kv_table
from softprompt.cartridges.chat import ChatFormat
from softprompt.cartridges.distillation import TopKDistillationLoss
from softprompt.cartridges.self_study import (
    Conversation,
    answer_queries,
    read_conversations,
    read_queries,
    self_study,
    write_conversations,
)
from softprompt.cartridges.teacher import DOCUMENT_ADAPTER, TopKTargets, document_cache, teacher_targets
from softprompt.data import DataError
from softprompt.files import atomic_write_json, sha256_of
from softprompt.methods.cartridge import prefill_key_values, table_from_key_values
from softprompt.model import SoftPromptModel
from softprompt.training.config import TrainConfig
from softprompt.training.prepared import DEFAULT_ADAPTER_NAME, PreparedData, held_out_indices
from softprompt.training.run_directory import RECIPE_DATA_DIR

CONVERSATIONS_FILE = "conversations.jsonl"
TEACHER_FILE = "teacher.safetensors"
MANIFEST_FILE = "manifest.json"


def read_corpus(path: str) -> str:
    """The corpus's text.

    Raises:
        DataError: a missing, unreadable, non-UTF-8 or empty file.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"corpus={path!r}: cannot read it as UTF-8 text ({error.__class__.__name__}). Fix: pass a "
                        "UTF-8 text file (--corpus FILE).") from None
    if not text.strip():
        raise DataError(f"corpus={path!r}: the file is empty. Fix: pass the document the adapter should stand for.")
    return text


def data_record(config: TrainConfig, corpus: str, base_model: Any) -> dict[str, Any]:
    """What the recipe's data depends on: if any of it differs, the stored data is not this run's."""
    settings = config.distillation
    queries = settings.queries
    if queries != "self-study" and not Path(queries).is_file():
        raise DataError(f"queries={queries!r}: file not found. Fix: pass a file of questions, or 'self-study'.")
    return {
        "corpus_sha256": sha256_of(corpus.encode("utf-8")),
        "queries": queries,
        "queries_sha256": None if queries == "self-study" else sha256_of(Path(queries).read_bytes()),
        "base_model": getattr(base_model.config, "_name_or_path", None) or None,
        **{name: getattr(settings, name) for name in ("num_conversations", "chunk_tokens", "max_answer_tokens",
                                                      "top_k")},
        "max_length": config.data.max_length,
        "seed": config.optimization.seed,
    }


def stored_data(directory: Path, record: dict[str, Any]) -> tuple[list[Conversation], TopKTargets] | None:
    """The conversations and teacher targets stored in `directory`, or None when there are none.

    Raises:
        DataError: they were made from other inputs (another corpus, queries file or setting), or a file does not
            match the manifest (damaged).
    """
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("record") != record:
        changed = sorted(key for key in record if manifest.get("record", {}).get(key) != record[key])
        raise DataError(f"{directory}: the run's data was made from other inputs ({', '.join(changed)} differ): the "
                        "corpus or the queries file changed since. Fix: restore them, or start over with --overwrite.")
    for name in (CONVERSATIONS_FILE, TEACHER_FILE):
        if not (directory / name).is_file() or sha256_of((directory / name).read_bytes()) != manifest["sha256"][name]:
            raise DataError(f"{directory / name}: missing or damaged (its SHA-256 is not the manifest's). Fix: start "
                            "over with --overwrite (the data is made again).")
    return read_conversations(directory / CONVERSATIONS_FILE), TopKTargets.load(directory / TEACHER_FILE)


def context_distillation_data(
    config: TrainConfig, tokenizer: Any, base_model: Any, whole_split: str | None = None
) -> PreparedData:
    """The recipe's examples, loss, init and files for a run (`softprompt.training.prepared.PreparedData`).

    Args:
        config: the run's settings (section ``distillation``; ``max_length``, ``eval_fraction``, ``seed``,
            ``eval_batch_size`` for the batches of generation and of the teacher).
        tokenizer: the base's tokenizer.
        base_model: the frozen base, on the run's device.
        whole_split: not used by this recipe (refused).

    Raises:
        DataError: an unusable corpus or queries file, stored data of other inputs, or ``--split``.
    """
    if whole_split is not None or base_model is None:
        raise DataError(f"split={whole_split!r}: the context-distillation recipe evaluates on its own held-out "
                        "conversations. Fix: evaluate without --split or --dataset.")
    settings = config.distillation
    corpus = read_corpus(settings.corpus)
    chat = ChatFormat(tokenizer)
    record = data_record(config, corpus, base_model)
    directory = config.resolved_output_dir / RECIPE_DATA_DIR
    stored = None if config.output.overwrite else stored_data(directory, record)
    context_ids = chat.context_ids(corpus)
    batch_size = config.optimization.eval_batch_size
    if stored is not None:
        conversations, targets = stored
        token_ids = [chat.conversation_ids(c.question, c.answer)[: config.data.max_length] for c in conversations]
    else:
        conversations = make_conversations(config, chat, corpus, base_model)
        token_ids = [chat.conversation_ids(c.question, c.answer)[: config.data.max_length] for c in conversations]
        teacher = SoftPromptModel.from_module(base_model, *document_cache(base_model, context_ids),
                                              adapter_name=DOCUMENT_ADAPTER)
        targets = teacher_targets(teacher, token_ids, settings.top_k, batch_size)

    examples = [{"input_ids": ids, "attention_mask": [1] * len(ids), "task": DEFAULT_ADAPTER_NAME, "conversation": r}
                for r, ids in enumerate(token_ids)]
    held_out = held_out_indices(len(examples), config.data.eval_fraction, config.optimization.seed, settings.corpus)

    def initialize(model: SoftPromptModel) -> None:
        if not settings.init_from_corpus:
            return
        for name, module in model.prompts.items():
            positions = model.adapter_configs[name].num_virtual_tokens
            if positions > len(context_ids):
                raise DataError(f"num_virtual_tokens={positions}: the corpus gives {len(context_ids)} tokens to start "
                                f"from. Fix: --num-virtual-tokens {len(context_ids)} or fewer, or "
                                "--no-init-from-corpus.")
            keys, values = prefill_key_values(base_model, context_ids[:positions])
            load_kv_table(module, table_from_key_values(keys, values, positions))

    def write(output_dir: Path) -> None:
        target = output_dir / RECIPE_DATA_DIR
        target.mkdir(parents=True, exist_ok=True)
        write_conversations(target / CONVERSATIONS_FILE, conversations)
        targets.save(target / TEACHER_FILE)
        digests = {name: sha256_of((target / name).read_bytes()) for name in (CONVERSATIONS_FILE, TEACHER_FILE)}
        atomic_write_json(target / MANIFEST_FILE, {"record": record, "sha256": digests,
                                                   "corpus_tokens": len(context_ids),
                                                   "conversations": len(conversations)})

    return PreparedData(
        kind="context_distillation",
        adapter_names=[DEFAULT_ADAPTER_NAME],
        train=[example for r, example in enumerate(examples) if r not in held_out],
        eval=[examples[r] for r in sorted(held_out)],
        eval_prompts=[],
        loss=TopKDistillationLoss(targets),
        initialize=initialize,
        write=write,
    )


def make_conversations(config: TrainConfig, chat: ChatFormat, corpus: str, base_model: Any) -> list[Conversation]:
    """Self-study conversations, or the queries file's questions with its answers (generated where missing)."""
    settings = config.distillation
    batch_size, seed = config.optimization.eval_batch_size, config.optimization.seed
    if settings.queries == "self-study":
        return self_study(base_model, chat, corpus, settings.num_conversations, settings.chunk_tokens,
                          settings.max_answer_tokens, batch_size, seed)
    queries = read_queries(Path(settings.queries))
    unanswered = [question for question, answer in queries if answer is None]
    answered = iter(answer_queries(base_model, chat, corpus, unanswered, settings.max_answer_tokens, batch_size,
                                   seed) if unanswered else [])
    return [Conversation(question, answer) if answer is not None else next(answered) for question, answer in queries]
