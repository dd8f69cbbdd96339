"""The state of one training run: what `softprompt.training.loop.setup` builds and the loop shares between its
steps (`RunState`), what a finished run returns (`TrainResult`), the events it reports and the two ways it stops
early (`TrainingDivergedError`, `TrainingInterrupted`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from softprompt.model import SoftPromptModel
from softprompt.training.checkpoint import Checkpoint
from softprompt.training.config import TrainConfig
from softprompt.training.evaluation import autocast
from softprompt.training.examples import PreparedData
from softprompt.training.metrics import MetricsLog

Event = dict[str, Any]
"""What the loop reports to ``on_event``: a dict with an ``"event"`` key (start, resumed, eval, checkpoint, done)."""


class TrainingDivergedError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; training stopped before touching the adapters."""


class TrainingInterrupted(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C): a KeyboardInterrupt whose message says where the run stopped and how to
    continue it. Everything written so far is complete (checkpoints and files are written atomically)."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    """The run's directory."""
    adapter_directories: dict[str, Path]
    """Final adapter directory of each adapter, by adapter name."""
    metrics_path: Path
    """The JSONL metrics file."""
    plot_path: Path | None
    """The loss/accuracy PNG (None where matplotlib could not draw it)."""
    base_model: str
    """What ``--model`` to pass to reload the base: a hub id, a directory or a ``.gguf`` file."""
    initial_eval: dict[str, Any] | None
    """The metrics record of the evaluation before training (None when evaluation is off; on rank 0 only)."""
    final_eval: dict[str, Any] | None
    """The metrics record of the evaluation after the last epoch (None when evaluation is off; rank 0 only)."""
    generations: list[dict[str, Any]] = field(default_factory=list)
    """A few held-out examples: ``prompt``, ``output`` (generated), ``reference`` and ``adapter``."""
    global_step: int = 0
    """Optimizer steps done in total."""
    elapsed_seconds: float = 0.0
    """Wall time of this process's call."""
    resumed_from: Path | None = None
    """The checkpoint the run continued from, if any."""


@dataclass
class RunState:
    """Everything the loop shares between its steps, built once by `setup`."""

    config: TrainConfig
    output_dir: Path
    rank: int
    world_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    tokenizer: Any
    base_name: str
    data: PreparedData
    model: SoftPromptModel
    trainable: dict[str, list[torch.nn.Parameter]]
    """Each adapter's trainable parameters, in the optimizer's order."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    metrics: MetricsLog
    steps_per_epoch: int
    total_steps: int
    sharded: bool = False
    """The base is sharded over the processes (``--fsdp``): every process runs every pass of the model."""
    on_event: Callable[[Event], None] | None = None
    stop_requested: Callable[[], bool] | None = None
    """Asked before every optimizer step (see `train`)."""
    checkpoint: Checkpoint | None = None
    """The checkpoint the run continues from (already loaded into the model and optimizer), or None."""
    start_epoch: int = 0
    start_step: int = 0
    """Where the loop starts: the epoch, and the optimizer steps already done in it."""
    global_step: int = 0
    """Optimizer steps done so far (from the checkpoint on, then counted by the loop)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates and writes files."""
        return self.rank == 0

    def emit(self, event: str, **values: Any) -> None:
        """Reports an event to ``on_event`` (rank 0 only)."""
        if self.is_main and self.on_event is not None:
            self.on_event({"event": event, **values})

    def barrier(self) -> None:
        """Waits for every process (a no-op alone)."""
        if self.world_size > 1:
            dist.barrier()

    def autocast(self) -> Any:
        """CUDA autocast for the forward passes (nothing on CPU)."""
        return autocast(self.device, self.autocast_dtype)

    def should_stop(self) -> bool:
        """Whether `stop_requested` says so, on any process (one small all-reduce when there are several)."""
        if self.stop_requested is None:
            return False
        requested = bool(self.stop_requested())
        if self.world_size > 1:
            flag = torch.tensor([int(requested)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        return requested
