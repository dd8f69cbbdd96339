"""The sections of a training run's settings: data, optimization, execution and output, each a typed dataclass
whose fields are documented and checked where they are declared (`softprompt.training.config.TrainConfig` nests
them; every field becomes a command-line flag)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from softprompt.loss import LossImplementation
from softprompt.training.config_values import (
    ConfigError,
    as_list,
    check_float,
    check_int,
    check_literals,
    check_strings,
)
from softprompt.training_loss import VirtualTokenLayout

DEFAULT_TEXT_COLUMN = "Tweet text"
"""Text column of the shipped complaints dataset (the default data)."""

DEFAULT_LABEL_COLUMN = "text_label"
"""Label column of the shipped complaints dataset (the default data)."""

SEED_PROMPT_TUNING_INIT_TEXT = "Classify if the tweet is a complaint or not:"
"""The seed guide's TEXT init for prompt tuning on twitter complaints."""

Padding = Literal["longest", "max_length"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
BaseDtype = Literal["float32", "bfloat16", "float16"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
Recipe = Literal["auto", "context-distillation"]

@dataclass
class DataConfig:
    """What to train and evaluate on, and how examples are built."""

    dataset: list[str] = field(default_factory=list)
    """Data sources: hub dataset names or local ``.csv/.json/.jsonl/.parquet`` files. Empty: the shipped
    complaints.csv. Two or more: one adapter per dataset, named after it (the file stem or the hub name's last
    part), trained together in mixed batches."""

    dataset_config: str | None = None
    """Hub dataset configuration, e.g. ``twitter_complaints`` for ``ought/raft``."""

    split: str = "train"
    """Split to train on (``datasets`` slicing works: ``train[:50]``)."""

    eval_split: str | None = None
    """Split to evaluate on. None: hold out ``eval_fraction`` of the training rows (seeded by ``seed``)."""

    eval_fraction: float = 0.2
    """Fraction of the training rows held out for evaluation when ``eval_split`` is None; 0 turns evaluation off."""

    text_column: list[str] = field(default_factory=list)
    """Text column; one name for all datasets or one per dataset. Empty: ``Tweet text`` for the shipped default
    data; required otherwise."""

    label_column: str | None = None
    """Label column: given, the classification-as-generation recipe; None, the causal-LM recipe on the text. With
    the shipped default data and no text column given: ``text_label``."""

    task_column: str | None = None
    """Column naming each row's task: one adapter per distinct value, saved as ``output_dir/adapters/<task>``
    (multitask prompt tuning: one adapter, a task id per value)."""

    context_examples: int = 4
    """CPT without cpt_token_ids: how many training examples form the in-context prompt (one label after another;
    they leave the training rows)."""

    max_length: int = 64
    """Most tokens per example (prompt + label + EOS for classification)."""

    padding: Padding = "longest"
    """``longest`` (pad each batch to its longest row) or ``max_length`` (the seed's fixed shape)."""

    recipe: Recipe = "auto"
    """What the rows are and what the loss is: ``auto`` (classification with a label column, else causal LM), or
    ``context-distillation`` (Cartridges' self-study on ``--corpus``: the section ``distillation``)."""

    def __post_init__(self) -> None:
        check_literals(self)
        check_strings(self)
        self.dataset = as_list(self.dataset, "dataset")
        self.text_column = as_list(self.text_column, "text_column")
        check_int("max_length", self.max_length, minimum=1)
        check_int("context_examples", self.context_examples, minimum=1)
        check_float("eval_fraction", self.eval_fraction, positive=False)
        if not self.eval_fraction < 1:
            raise ConfigError(
                f"eval_fraction={self.eval_fraction!r}: expected a fraction in [0, 1) of the rows to hold out. "
                "Fix: pass e.g. --eval-fraction 0.2 (or 0 to skip evaluation)."
            )
        if self.text_column and len(self.text_column) not in (1, max(1, len(self.dataset))):
            raise ConfigError(
                f"text_column={self.text_column!r} for {len(self.dataset)} datasets: expected one column for all "
                "datasets or one per dataset, in the same order. Fix: repeat --text-column once per --dataset."
            )
        if self.dataset and not self.text_column:
            raise ConfigError(
                f"dataset={self.dataset!r} without text_column: expected the name of the column holding the text. "
                "Fix: pass --text-column (e.g. --text-column quote for Abirate/english_quotes)."
            )
        adapter_names = [adapter_name_for_source(source) for source in self.dataset]
        if len(set(adapter_names)) < len(adapter_names):
            raise ConfigError(
                f"dataset={self.dataset!r}: each dataset trains an adapter named after it ({adapter_names}), and two "
                "names collide. Fix: rename or copy a file so that the names differ."
            )
        if len(self.dataset) > 1 and self.task_column is not None:
            raise ConfigError(
                f"task_column={self.task_column!r} with {len(self.dataset)} datasets: several datasets already mean "
                "one task (adapter) per dataset. Fix: pass either one --dataset with --task-column, or several "
                "datasets without it."
            )
        if self.dataset_config is not None and len(self.dataset) > 1:
            raise ConfigError(
                f"dataset_config={self.dataset_config!r} with {len(self.dataset)} datasets: a configuration names a "
                "part of one hub dataset. Fix: train one hub dataset with a configuration at a time."
            )

    @property
    def uses_default_data(self) -> bool:
        """True when the data is the shipped complaints.csv (no ``dataset`` given)."""
        return not self.dataset

    @property
    def resolved_text_columns(self) -> list[str]:
        """One text column per data source."""
        sources = max(1, len(self.dataset))
        columns = self.text_column or [DEFAULT_TEXT_COLUMN]
        return columns * sources if len(columns) == 1 else list(columns)

    @property
    def resolved_label_column(self) -> str | None:
        """The label column, with the shipped default data's ``text_label`` when nothing was said."""
        if self.label_column is None and self.uses_default_data and not self.text_column:
            return DEFAULT_LABEL_COLUMN
        return self.label_column


@dataclass
class OptimizationConfig:
    """How the adapters' parameters are updated."""

    learning_rate: float = 3e-2
    """Peak AdamW learning rate."""

    weight_decay: float = 0.01
    """AdamW weight decay (torch's default, which the seed guide uses)."""

    num_epochs: int = 20
    """Passes over the training rows."""

    batch_size: int = 8
    """Rows per micro-batch per process. Global batch = batch_size x gradient_accumulation_steps x processes."""

    eval_batch_size: int = 32
    """Rows per evaluation batch."""

    gradient_accumulation_steps: int = 1
    """Micro-batches summed into one optimizer step."""

    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to ``learning_rate``; then linear decay to 0 at the last step."""

    max_grad_norm: float = 1.0
    """Clip each adapter's gradient to this L2 norm; 0 turns clipping off (the seed guides do not clip)."""

    seed: int = 0
    """Seeds the prompt initialization, the held-out split and the data order: a run is reproducible on CPU."""

    def __post_init__(self) -> None:
        check_literals(self)
        check_strings(self)
        for name in ("num_epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "seed"):
            check_int(name, getattr(self, name), minimum=0)
        check_float("learning_rate", self.learning_rate, positive=True)
        check_float("weight_decay", self.weight_decay, positive=False)
        check_float("max_grad_norm", self.max_grad_norm, positive=False)


@dataclass
class ExecutionConfig:
    """Where and how a step runs. These fields may change at ``--resume`` (a run may move to another machine), but
    they can change floating-point rounding: bit-for-bit equality with an uninterrupted run holds while they stay."""

    base_dtype: BaseDtype = "float32"
    """dtype the frozen base is loaded in. The prompts stay fp32."""

    mixed_precision: MixedPrecision = "auto"
    """CUDA autocast: ``auto`` (bf16 where supported, else fp16), ``bf16``, ``fp16`` or ``no``. Always ``no`` on
    CPU."""

    loss_implementation: LossImplementation = "torch"
    """`SoftPromptModel.compute_loss` implementation: ``torch``, ``triton`` or ``full``."""

    virtual_token_layout: VirtualTokenLayout = "auto"
    """How the training loss feeds virtual tokens: ``prefix`` (once per prompt, as keys and values: fewer FLOPs, a
    second short pass), ``sequence`` (in front of every row, one pass: fewer kernel launches), or ``auto``: whichever
    saves more for the batch, the model and the device (`softprompt.training_loss.choose_layout`); the run's start
    line says which."""

    compile: CompileMode | None = None
    """``torch.compile`` mode for the frozen decoder's passes in the training loss
    (`SoftPromptModel.compile_decoder`); None: eager. Each new batch shape compiles first."""

    device: Device = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``."""

    num_threads: int | None = None
    """CPU threads for torch during the run. None: 1 for tiny models (their matrices are too small to gain from
    threads, and idle threads spinning on a busy machine slow every step), torch's default otherwise."""

    fsdp: bool = False
    """Under ``torchrun``, shard the frozen base over the processes with PyTorch's FSDP2 (``fully_shard``): each
    process keeps 1/N of its weights and gathers one decoder layer at a time, for bases that do not fit one device
    (the embeddings and LM head are gathered for each call). The adapters stay whole on every process; checkpoints
    and adapter files are the same as without it. Off: every process holds the whole base. Without ``torchrun``
    (one process, no process group) it changes nothing (`softprompt.training.fsdp`)."""

    def __post_init__(self) -> None:
        check_literals(self)
        check_strings(self)
        if not isinstance(self.fsdp, bool):
            raise ConfigError(f"fsdp={self.fsdp!r}: expected true or false.")
        if self.num_threads is not None:
            check_int("num_threads", self.num_threads, minimum=1)


@dataclass
class OutputConfig:
    """Where the run writes, how often it checkpoints, and what it reports."""

    output_dir: str | None = None
    """Where adapter, metrics, plot and checkpoints go. None: ``softprompt-runs/<method>``."""

    save_every: int = 100
    """Write a checkpoint every this many optimizer steps (0: only at epoch ends, which always get one)."""

    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""

    resume: bool = False
    """Continue from the newest usable checkpoint in ``output_dir`` (starts fresh where there never was one)."""

    overwrite: bool = False
    """Start over even if ``output_dir`` holds a previous run's checkpoints (they are deleted)."""

    num_generations: int = 4
    """Held-out examples generated at the end and reported (0: none)."""

    progress: bool = True
    """Show tqdm progress bars."""

    def __post_init__(self) -> None:
        check_literals(self)
        check_strings(self)
        check_int("keep_last", self.keep_last, minimum=1)
        for name in ("save_every", "num_generations"):
            check_int(name, getattr(self, name), minimum=0)
        for name in ("resume", "overwrite", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected true or false.")
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume=True and overwrite=True: one continues the run in output_dir, the other deletes it. "
                "Fix: pass only one of --resume / --overwrite."
            )


@dataclass
class DistillationConfig:
    """The context-distillation recipe (``--recipe context-distillation``): a cartridge (or a plain prefix) trained so
    that the frozen model with it answers as with the whole corpus in context (``softprompt/cartridges/``)."""

    corpus: str | None = None
    """The document (a UTF-8 text file) the adapter stands in for: the teacher reads it in context. Required by the
    recipe."""

    queries: str = "self-study"
    """Where the conversations' questions come from: ``self-study`` (the frozen model asks them about chunks of the
    corpus, then answers them) or a file: one question per line (.txt), or JSON lines with ``question`` and
    optionally ``answer`` (used as given: a run's own ``data/conversations.jsonl`` repeats it without generating)."""

    num_conversations: int = 64
    """Self-study conversations to generate (a question and its answer each)."""

    chunk_tokens: int = 512
    """Self-study shows the model one chunk of the corpus of at most this many tokens at a time."""

    max_answer_tokens: int = 128
    """Most new tokens of a generated answer (a question: at most 64)."""

    top_k: int = 20
    """The teacher's k most likely next tokens kept at every position (the paper's 20): the student matches their
    distribution, and the loss needs only those k rows of the LM head."""

    init_from_corpus: bool = True
    """Start the adapter as the corpus's first P tokens in context (the frozen model's own cache of them, the paper's
    choice); ``--no-init-from-corpus`` keeps the adapter's own init (N(0, 1), or ``--init-text``)."""

    def __post_init__(self) -> None:
        check_literals(self)
        check_strings(self)
        for name in ("num_conversations", "chunk_tokens", "max_answer_tokens", "top_k"):
            check_int(name, getattr(self, name), minimum=1)
        if not isinstance(self.init_from_corpus, bool):
            raise ConfigError(f"init_from_corpus={self.init_from_corpus!r}: expected true or false.")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optimization": OptimizationConfig,
    "execution": ExecutionConfig,
    "output": OutputConfig,
    "distillation": DistillationConfig,
}
"""The nested sections of `TrainConfig`, by field name."""



def adapter_name_for_source(source: str) -> str:
    """The adapter name a data source gets in multi-dataset training: file stem or the hub name's last part."""
    path = Path(source)
    stem = path.stem if path.suffix else source.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "dataset"
