"""Multitask prompt tuning: one shared prompt, rescaled for each task by a low-rank matrix.

Wang, Panda, Karlinsky, Feris, Sun and Kim, "Multitask Prompt Tuning Enables Parameter-Efficient Transfer Learning"
(ICLR 2023, arXiv:2303.02861).

The method in one sentence: instead of one free ``[P, C]`` prompt per task (prompt tuning), all N tasks share one
prompt ``W [P, C]``, and task t rescales it elementwise by a rank-r matrix ``cols[t] @ rows[t]``
(``[P, r] @ [r, C]``), so each extra task costs ``(P + C) * r`` numbers instead of ``P * C``:

    prompt_t = W * (cols[t] @ rows[t])            # [P, C], * elementwise (the paper's W o (u_t v_t^T), rank r)

The paper trains the shared prompt on many source tasks (with distillation from per-task prompts) and then adapts
it to a target task. Like PEFT, softprompt implements the parameterization and the transfer step, not the
distillation: train an adapter with ``num_tasks`` source tasks, save it, and start a target adapter from that file
(``prompt_tuning_init_state_dict_path``) with one of the source inits below.

How it enters the model: as prompt tuning's virtual tokens (``softprompt/methods/prompt_tuning.py``), except that
every row brings its task id (``task_ids [B]`` in `SoftPromptModel.forward`, ``compute_loss``, ``summed_loss`` and
``generate``) and gets its own task's prompt. `enter` computes one prompt per distinct task of the call's rows
(`softprompt.entries.VirtualTokens` ``[G, P, C]`` with each row's prompt index), so a batch of many rows and few
tasks runs each task's virtual tokens once in the prefix layout. `reference_forward` writes PEFT's way out.

Initialization (``prompt_tuning_init``), each as PEFT does it:

- ``RANDOM`` (default): ``W ~ N(0, 1)`` (``nn.Embedding``'s default), ``cols, rows ~ N(0, 0.02^2)``. Each prompt entry
  is then a sum of r products of two N(0, 0.02^2) numbers times W: the prompt starts close to zero (std about
  4e-4 * sqrt(r)), as in PEFT.
- ``TEXT`` / ``SAMPLE_VOCAB``: W from token embeddings, as prompt tuning's inits (a text repeated or cut to P ids;
  SAMPLE_VOCAB draws only ids the tokenizer can produce); cols and rows random as above. The product scales the
  text's embeddings down by the same ~4e-4 at the start. PEFT's enum has no SAMPLE_VOCAB, but PEFT accepts it.
- ``AVERAGE_SOURCE_TASKS`` / ``EXACT_SOURCE_TASK``: W, cols and rows from a source adapter's file; cols and rows
  averaged over its tasks, or those of task ``prompt_tuning_init_task``. PEFT loads them only into a target of
  exactly one task (anything else fails with a size mismatch); softprompt starts every target task from them.
- ``ONLY_SOURCE_SHARED``: W from the source file, cols and rows random.

The source file is read with safetensors only (softprompt never unpickles; PEFT also reads pickled ``.bin``
files): PEFT's ``adapter_model.safetensors`` (``prompt_embeddings``, ``prefix_task_cols``, ``prefix_task_rows``),
softprompt's ``adapter.safetensors`` of a multitask adapter, or a directory holding either.

Where softprompt differs from PEFT on purpose: ``prompt_tuning_init`` is validated (PEFT treats an unknown name as
RANDOM), ``num_tasks`` and ``num_ranks`` must be positive (PEFT accepts 0), and task ids outside ``[0, num_tasks)``
are refused by name. ``task_names`` (softprompt's own field) records which task each id is, so that training,
evaluation and generation from the command line map a data set's task column to the same ids; PEFT's format has
no place for it.

Shapes: B batch, T tokens, P virtual tokens, C embedding width, N tasks, r ranks, G distinct tasks in a call.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from softprompt.entries import EntryRequest, VirtualTokens
from softprompt.families import family_of
from softprompt.families.family import BaseModelShape
from softprompt.files import read_safetensors
from softprompt.methods.prompt_tuning import init_token_ids
from softprompt.methods.prompt_tuning import reference_forward as prompt_tuning_reference_forward
from softprompt.methods.spec import PEFT_TENSOR, MethodSpec, Paper, check_fits_in_memory, check_positive_int

PEFT_COLUMNS = "prefix_task_cols"
PEFT_ROWS = "prefix_task_rows"
SOURCE_FILES = ("adapter_model.safetensors", "adapter.safetensors")
"""What a source directory may hold: PEFT's adapter file, or softprompt's."""


class MultitaskPromptTuningInit(str, enum.Enum):
    """How the shared prompt and the task matrices start (PEFT's names and values)."""

    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


SOURCE_INITS = (
    MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS,
    MultitaskPromptTuningInit.EXACT_SOURCE_TASK,
    MultitaskPromptTuningInit.ONLY_SOURCE_SHARED,
)
"""The inits that read a source adapter's file."""


@dataclass
class MultitaskPromptTuningConfig:
    """Configuration of multitask prompt tuning; a PEFT user switches by changing the import."""

    num_virtual_tokens: int = None  # type: ignore[assignment]
    """P, the number of virtual tokens put in front of every input. Required."""

    prompt_tuning_init: MultitaskPromptTuningInit | str = MultitaskPromptTuningInit.RANDOM
    """``RANDOM``, ``TEXT``, ``SAMPLE_VOCAB``, ``AVERAGE_SOURCE_TASKS``, ``EXACT_SOURCE_TASK`` or
    ``ONLY_SOURCE_SHARED``; see the module docstring."""

    prompt_tuning_init_text: str | None = None
    """The text whose token embeddings start the shared prompt when ``prompt_tuning_init`` is ``TEXT``."""

    tokenizer_name_or_path: str | None = None
    """Recorded for PEFT compatibility; softprompt never loads a tokenizer itself (pass one to the model)."""

    tokenizer_kwargs: dict[str, Any] | None = None
    """Recorded for PEFT compatibility (PEFT's keyword arguments for loading the TEXT init's tokenizer)."""

    prompt_tuning_init_state_dict_path: str | None = None
    """The source adapter for the source inits: a ``.safetensors`` file (PEFT's or softprompt's) or a directory
    holding one."""

    prompt_tuning_init_task: int = 0
    """The source task ``EXACT_SOURCE_TASK`` starts from."""

    num_ranks: int = 1
    """r, the rank of each task's matrix ``cols[t] @ rows[t]``."""

    num_tasks: int = 1
    """N, the number of tasks, each with its own ``cols [P, r]`` and ``rows [r, C]``."""

    task_names: list[str] | None = None
    """Which task each id is (softprompt's own field): ``task_names[t]`` names task t. Training from the command
    line fills it from the data's task column, and evaluation and generation map task names to the same ids."""

    method: ClassVar[str] = "multitask_prompt_tuning"

    def __post_init__(self) -> None:
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens,
                           "MultitaskPromptTuningConfig(num_virtual_tokens=8, num_tasks=2)")
        try:
            init = self.prompt_tuning_init
            self.prompt_tuning_init = MultitaskPromptTuningInit(init.upper() if isinstance(init, str) else init)
        except ValueError:
            choices = ", ".join(member.value for member in MultitaskPromptTuningInit)
            raise ValueError(
                f"prompt_tuning_init={self.prompt_tuning_init!r}: expected one of {choices}. Fix: pick one of those "
                "names (PEFT would silently use RANDOM for an unknown one)."
            ) from None
        check_positive_int("num_ranks", self.num_ranks, "num_ranks=1")
        check_positive_int("num_tasks", self.num_tasks, "num_tasks=2 (one per task of your data)")
        init = self.prompt_tuning_init
        for name in ("prompt_tuning_init_text", "tokenizer_name_or_path", "prompt_tuning_init_state_dict_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}={value!r}: expected a string or None. Fix: quote it, or leave it out.")
        if init is MultitaskPromptTuningInit.TEXT and not self.prompt_tuning_init_text:
            raise ValueError(
                f"prompt_tuning_init_text={self.prompt_tuning_init_text!r} with prompt_tuning_init=TEXT: expected a "
                "non-empty text to initialize from. Fix: pass prompt_tuning_init_text='Classify the text:' (and a "
                "tokenizer to SoftPromptModel), or use prompt_tuning_init='RANDOM'."
            )
        if init is not MultitaskPromptTuningInit.TEXT:
            for name in ("prompt_tuning_init_text", "tokenizer_kwargs"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} with prompt_tuning_init={init.value}: it would be ignored, "
                        "since only TEXT init starts from a text. Fix: pass prompt_tuning_init='TEXT', or drop it."
                    )
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise ValueError(f"tokenizer_kwargs={self.tokenizer_kwargs!r}: expected a dict or None.")
        path = self.prompt_tuning_init_state_dict_path
        if init in SOURCE_INITS and not path:
            raise ValueError(
                f"prompt_tuning_init={init.value} without prompt_tuning_init_state_dict_path: expected the source "
                "adapter to start from. Fix: pass prompt_tuning_init_state_dict_path='source/adapter_model."
                "safetensors' (a multitask adapter saved with save_pretrained, either format)."
            )
        if init not in SOURCE_INITS and path is not None:
            raise ValueError(
                f"prompt_tuning_init_state_dict_path={path!r} with prompt_tuning_init={init.value}: the file would be "
                "ignored. Fix: pass prompt_tuning_init='AVERAGE_SOURCE_TASKS', 'EXACT_SOURCE_TASK' or "
                "'ONLY_SOURCE_SHARED' to start from it, or drop the path."
            )
        task = self.prompt_tuning_init_task
        if isinstance(task, bool) or not isinstance(task, int) or task < 0:
            raise ValueError(
                f"prompt_tuning_init_task={task!r}: expected a source task id, an int >= 0. Fix: pass e.g. "
                "prompt_tuning_init_task=0."
            )
        if self.task_names is not None:
            names = list(self.task_names)
            if (len(names) != self.num_tasks or len(set(names)) != len(names)
                    or not all(isinstance(name, str) and name for name in names)):
                raise ValueError(
                    f"task_names={self.task_names!r} with num_tasks={self.num_tasks}: expected {self.num_tasks} "
                    "distinct non-empty names, task_names[t] naming task t. Fix: one name per task, or None."
                )
            self.task_names = names


class MultitaskPromptEmbedding(nn.Module):
    """The shared prompt ``W [P, C]`` and every task's ``cols [N, P, r]`` and ``rows [N, r, C]``.

    The names are PEFT's (``embedding.weight``, ``prefix_task_cols``, ``prefix_task_rows``), so that state dicts
    move between the two libraries under ``prompt_encoder.<adapter>.``.

    Args:
        config: the configuration.
        embedding_width: C, the width of the base model's input embeddings.
    """

    def __init__(self, config: MultitaskPromptTuningConfig, embedding_width: int):
        super().__init__()
        self.config = config
        num_virtual, ranks, tasks = config.num_virtual_tokens, config.num_ranks, config.num_tasks
        self.embedding = nn.Embedding(num_virtual, embedding_width)  # W, N(0, 1) as in PEFT
        # Drawn in PEFT's order and with its call, so that one seed gives PEFT's initialization.
        self.prefix_task_cols = nn.Parameter(torch.normal(mean=0, std=0.02, size=(tasks, num_virtual, ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(mean=0, std=0.02, size=(tasks, ranks, embedding_width)))

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """The prompts of tasks `task_ids` ``[G]``: ``[G, P, C]`` = W * (cols[t] @ rows[t]) for each."""
        scales = torch.matmul(self.prefix_task_cols[task_ids], self.prefix_task_rows[task_ids])  # [G, P, C]
        return self.embedding.weight * scales  # W [P, C] broadcast over the G tasks


def read_source_state(path: str) -> dict[str, torch.Tensor]:
    """A source multitask adapter's W, cols and rows, under PEFT's names (``prompt_embeddings``,
    ``prefix_task_cols``, ``prefix_task_rows``), from PEFT's file or softprompt's (safetensors only).

    Raises:
        ValueError: not a safetensors file (or a directory holding one), or not a multitask adapter's tensors.
    """
    source = Path(path)
    if source.is_dir():
        found = [source / name for name in SOURCE_FILES if (source / name).is_file()]
        if not found:
            raise ValueError(
                f"prompt_tuning_init_state_dict_path={path!r}: the directory holds neither of {list(SOURCE_FILES)}. "
                "Fix: point to a multitask adapter saved with save_pretrained (either format), or to its file."
            )
        source = found[0]
    if source.suffix != ".safetensors":
        raise ValueError(
            f"prompt_tuning_init_state_dict_path={path!r}: expected a .safetensors file; softprompt never unpickles "
            "(.bin / .pt files can run code when loaded). Fix: save the source adapter with save_pretrained, or "
            "convert the file with safetensors.torch.save_file."
        )
    tensors = read_safetensors(source, error=ValueError, record="the source path")
    ours = {PEFT_TENSOR: "prompt.embedding.weight", PEFT_COLUMNS: f"prompt.{PEFT_COLUMNS}",
            PEFT_ROWS: f"prompt.{PEFT_ROWS}"}
    if all(name in tensors for name in ours.values()):
        return {peft_name: tensors[name].float() for peft_name, name in ours.items()}
    missing = sorted(name for name in ours if name not in tensors)
    if missing:
        raise ValueError(
            f"{source}: tensors {missing} missing (found {sorted(tensors)}): expected a multitask prompt tuning "
            "adapter. Fix: point to the file of an adapter trained with MultitaskPromptTuningConfig."
        )
    return {name: tensors[name].float() for name in ours}


def init_from_source(module: MultitaskPromptEmbedding, config: MultitaskPromptTuningConfig) -> None:
    """Sets W (and, except for ONLY_SOURCE_SHARED, cols and rows) from the source adapter (the module docstring).

    Raises:
        ValueError: the source's shapes do not fit this config (naming them), or the source task is out of range.
    """
    source = read_source_state(config.prompt_tuning_init_state_dict_path)
    shared, columns, rows = source[PEFT_TENSOR], source[PEFT_COLUMNS], source[PEFT_ROWS]
    where = f"source {config.prompt_tuning_init_state_dict_path!r}"
    if shared.shape != module.embedding.weight.shape:
        raise ValueError(
            f"{where}: its shared prompt is {list(shared.shape)}, this adapter's [P, C] = "
            f"{list(module.embedding.weight.shape)}. Fix: num_virtual_tokens={shared.shape[0]}, on a base of the "
            "source's width."
        )
    init = config.prompt_tuning_init
    with torch.no_grad():
        module.embedding.weight.copy_(shared)
        if init is MultitaskPromptTuningInit.ONLY_SOURCE_SHARED:
            return
        expected = (module.prefix_task_cols.shape[1:], module.prefix_task_rows.shape[1:])  # [P, r], [r, C]
        if (columns.shape[1:], rows.shape[1:]) != expected:
            raise ValueError(
                f"{where}: its task matrices are cols {list(columns.shape)}, rows {list(rows.shape)} ([N, P, r], "
                f"[N, r, C]); this adapter's rank is {config.num_ranks}. Fix: num_ranks={columns.shape[2]}, or "
                "prompt_tuning_init='ONLY_SOURCE_SHARED' to take only the shared prompt."
            )
        if init is MultitaskPromptTuningInit.EXACT_SOURCE_TASK:
            task = config.prompt_tuning_init_task
            if task >= columns.shape[0]:
                raise ValueError(
                    f"prompt_tuning_init_task={task}: the {where} has {columns.shape[0]} tasks. Fix: a task id in "
                    f"[0, {columns.shape[0]})."
                )
            columns, rows = columns[task], rows[task]  # [P, r], [r, C]
        else:  # AVERAGE_SOURCE_TASKS
            columns, rows = columns.mean(dim=0), rows.mean(dim=0)
        # Every target task starts from the source's (PEFT: only a target of exactly one task).
        module.prefix_task_cols.copy_(columns.expand_as(module.prefix_task_cols))
        module.prefix_task_rows.copy_(rows.expand_as(module.prefix_task_rows))


def empty(config: MultitaskPromptTuningConfig, shape: BaseModelShape) -> MultitaskPromptEmbedding:
    """The module's structure, about to receive stored weights."""
    return MultitaskPromptEmbedding(config, shape.embedding_width)


def build(
    config: MultitaskPromptTuningConfig, base_model: PreTrainedModel, tokenizer: Any | None
) -> MultitaskPromptEmbedding:
    """The module, initialized as ``config.prompt_tuning_init`` says, on the base's device."""
    shape = family_of(base_model.config).shape(base_model.config)
    word_embeddings = base_model.get_input_embeddings()
    device = word_embeddings.weight.device
    check_fits_in_memory(config, shape.embedding_width, device)
    init = config.prompt_tuning_init
    token_ids = None
    if init in (MultitaskPromptTuningInit.TEXT, MultitaskPromptTuningInit.SAMPLE_VOCAB):
        token_ids = init_token_ids(config, tokenizer)  # prompt tuning's rules (PEFT's TEXT rule, producible ids)
    module = empty(config, shape)  # on the CPU, drawing from the CPU generator as PEFT does
    if token_ids is not None:
        with torch.no_grad():  # through the embedding module: what the model feeds its first layer
            module.embedding.weight.copy_(word_embeddings(torch.tensor(token_ids, device=device)).float())
    if init in SOURCE_INITS:
        init_from_source(module, config)
    return module.to(device)


def valid_task_ids(config: MultitaskPromptTuningConfig, task_ids: torch.Tensor | None) -> torch.Tensor:
    """The rows' task ids, checked against the config.

    Raises:
        ValueError: no task ids (the call must say each row's task), or an id outside ``[0, num_tasks)``.
    """
    names = f" ({', '.join(f'{t}={name}' for t, name in enumerate(config.task_names))})" if config.task_names else ""
    if task_ids is None:
        raise ValueError(
            f"A multitask prompt tuning adapter ({config.num_tasks} task(s){names}) needs each row's task: got "
            "task_ids=None. Fix: pass task_ids=torch.tensor([...]) with one task id per row to forward, "
            "compute_loss, summed_loss and generate."
        )
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= config.num_tasks):
        bad = sorted({int(t) for t in task_ids.tolist() if not 0 <= t < config.num_tasks})
        raise ValueError(
            f"task_ids holds {bad}: expected task ids in [0, {config.num_tasks}) for this adapter's "
            f"{config.num_tasks} task(s){names}. Fix: map each row's task to its id."
        )
    return task_ids


def task_ids_of(config: MultitaskPromptTuningConfig, tasks: Sequence[str | int]) -> list[int]:
    """Task ids for task names (``config.task_names``) or ids given as ints or digit strings.

    Raises:
        ValueError: a task that is neither a recorded name nor an id in range.
    """
    ids = []
    for task in tasks:
        if config.task_names is not None and task in config.task_names:
            ids.append(config.task_names.index(task))
        elif isinstance(task, int) and not isinstance(task, bool) and 0 <= task < config.num_tasks:
            ids.append(task)
        elif isinstance(task, str) and task.isdigit() and int(task) < config.num_tasks:
            ids.append(int(task))
        else:
            known = f"the names {config.task_names} or " if config.task_names else ""
            raise ValueError(
                f"task {task!r}: this multitask adapter knows {known}the ids 0 to {config.num_tasks - 1}. Fix: use "
                "one of those (softprompt generate --task; softprompt eval: a --task-column holding them)."
            )
    return ids


def enter(module: nn.Module, request: EntryRequest) -> VirtualTokens:
    """One prompt per distinct task of the rows, and which one each row uses."""
    task_ids = valid_task_ids(module.config, request.task_ids)
    device = module.embedding.weight.device
    tasks, group_of_row = torch.unique(task_ids, return_inverse=True)  # [G], [R]
    prompts = module(tasks.to(device))  # [G, P, C]
    return VirtualTokens(prompts, None if len(tasks) == 1 else group_of_row.to(device))


def reference_forward(
    base_model: PreTrainedModel,
    module: MultitaskPromptEmbedding,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    task_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> CausalLMOutputWithPast:
    """Each row's task prompt in front of it, as PEFT computes and places it; the plain reference the engine is
    tested against.

    Args:
        base_model: the frozen transformers causal LM.
        module: the multitask module.
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.
        task_ids: ``[B]`` each row's task.
        labels: ``[B, T]`` (-100 where no loss is wanted) or None.

    Returns:
        The base model's output: ``.logits [B, P + T, V]`` (virtual positions first, as in PEFT) and ``.loss``.
    """
    task_ids = task_ids.to(module.embedding.weight.device)
    # PEFT: every row looks up W [P, C] and multiplies it by its own task's cols @ rows.
    scales = torch.matmul(torch.index_select(module.prefix_task_cols, 0, task_ids),
                          torch.index_select(module.prefix_task_rows, 0, task_ids))  # [B, P, C]
    virtual_tokens = module.embedding.weight.expand(len(task_ids), -1, -1) * scales  # [B, P, C]
    return prompt_tuning_reference_forward(base_model, virtual_tokens, input_ids, attention_mask, labels)


def peft_tensors(config: MultitaskPromptTuningConfig, base_model: PreTrainedModel) -> dict[str, tuple[int, ...]]:
    """PEFT's three tensors: W ``[P, C]`` (as ``prompt_embeddings``, untouched by any task), cols and rows."""
    width = family_of(base_model.config).shape(base_model.config).embedding_width
    tasks, num_virtual, ranks = config.num_tasks, config.num_virtual_tokens, config.num_ranks
    return {PEFT_TENSOR: (num_virtual, width), PEFT_COLUMNS: (tasks, num_virtual, ranks),
            PEFT_ROWS: (tasks, ranks, width)}


def peft_state(module: MultitaskPromptEmbedding, base_model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves: its parameters, W under the name ``prompt_embeddings``."""
    return {PEFT_TENSOR: module.embedding.weight, PEFT_COLUMNS: module.prefix_task_cols,
            PEFT_ROWS: module.prefix_task_rows}


def peft_module(
    config: MultitaskPromptTuningConfig, base_model: PreTrainedModel, tensors: dict[str, torch.Tensor]
) -> MultitaskPromptEmbedding:
    """A module holding PEFT's saved tensors (the whole adapter: PEFT drops nothing of this method)."""
    module = empty(config, family_of(base_model.config).shape(base_model.config))
    module.load_state_dict({"embedding.weight": tensors[PEFT_TENSOR], PEFT_COLUMNS: tensors[PEFT_COLUMNS],
                            PEFT_ROWS: tensors[PEFT_ROWS]})
    return module


METHOD = MethodSpec(
    name="multitask_prompt_tuning",
    cli_name="multitask-prompt-tuning",
    config_class=MultitaskPromptTuningConfig,
    enters_as="virtual_tokens",
    build=build,
    empty=empty,
    enter=enter,
    peft_type="MULTITASK_PROMPT_TUNING",
    peft_fields=("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                 "tokenizer_kwargs", "prompt_tuning_init_state_dict_path", "prompt_tuning_init_task", "num_ranks",
                 "num_tasks"),
    default_num_virtual_tokens=8,
    peft_module=peft_module,
    paper=Paper("Wang et al.", 2023, "2303.02861",
                "Multitask Prompt Tuning Enables Parameter-Efficient Transfer Learning"),
    trains="a shared `[P, C]` prompt and, for each of N tasks, rank-r factors `[P, r]` and `[r, C]` (N = "
           "`num_tasks`, r = `num_ranks`)",
    peft_tensors=peft_tensors,
    peft_state=peft_state,
    materialized=None,  # one prompt per task: no single output table
    reference_forward=reference_forward,
    exports=(MultitaskPromptTuningConfig, MultitaskPromptTuningInit),
    takes_task_ids=True,
)
