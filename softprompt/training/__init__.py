"""Training runs: a `TrainConfig` in, trained adapters, metrics, a plot and checkpoints out.

- ``config.py``: the settings, nested by section, with their defaults and checks;
- ``loop.py``: `train`, the whole loop in one function (`run_loop`) over the state `setup` builds;
- ``run_state.py``: that state (`RunState`), what a run returns (`TrainResult`) and how it stops early;
- ``optimizer_step.py``: one optimizer step (accumulation, all-reduce, per-adapter normalization and clipping,
  the fp16 scaler, the NaN check);
- ``examples.py``, ``evaluation.py``, ``metrics.py``, ``checkpoint.py``, ``run_directory.py``, ``run_lock.py``,
  ``base_model.py``: the data, evaluation, the metrics log and plot, checkpoints, the run directory and its lock,
  the frozen base; ``fsdp.py``: the frozen base sharded over processes (``--fsdp``).
"""

from softprompt.training.base_model import load_adapters, load_base_model, resolve_base_model, run_config_for_adapter
from softprompt.training.config import ConfigError, TrainConfig
from softprompt.training.evaluation import evaluate, evaluate_adapters, generate_labels, generate_texts
from softprompt.training.examples import PreparedData, epoch_order, prepare_data
from softprompt.training.fsdp import shard_frozen_base
from softprompt.training.loop import TrainingDivergedError, TrainingInterrupted, TrainResult, train
from softprompt.training.metrics import plot_metrics, read_metrics

__all__ = [
    "ConfigError",
    "PreparedData",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "epoch_order",
    "evaluate",
    "evaluate_adapters",
    "generate_labels",
    "generate_texts",
    "load_adapters",
    "load_base_model",
    "plot_metrics",
    "prepare_data",
    "read_metrics",
    "resolve_base_model",
    "run_config_for_adapter",
    "shard_frozen_base",
    "train",
]
