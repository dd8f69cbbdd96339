"""The shared benchmark harness: timing, peak memory, machine description, random BLOOM models, result files.

Every benchmark script in ``benchmarks/`` is a thin, flat script on top of this module; run them from the repository
root (``python benchmarks/<name>.py``), which puts this folder on ``sys.path`` so ``import harness`` works.

API:

- `time_function(fn, warmup, repeats, sync)` -> `Timing` (median, spread, samples), and `time_alternating`, which
  interleaves several functions repeat by repeat so that slow drifts of the machine (thermal, other load) hit every
  contender alike.
- `wait_until_idle()`: on a shared machine, start timing when the other processes are quiet.
- `PeakMemory`: a context manager measuring the peak memory a block of code adds (CUDA: allocator peak; CPU: peak
  resident set size, sampled; see its docstring for why that is honest).
- `machine_info(device)` -> dict (CPU model, cores, threads, torch / transformers / peft / triton versions, GPU, the
  load average at the start; `write_results` adds the load average at the end).
- `matmul_peak_gflops(device, dtype)`: the measured GEMM rate, the "peak" that step FLOPs are compared with.
- `build_random_bloom(shape, num_layers, dtype, device, seed)`: a BLOOM of a published shape with random weights;
  `build_random_model(name_or_config, num_layers, ...)` the same for any supported family's model;
  `narrow_config(family)` the deep, narrow model of the launch-bound configs.
- `ops_per_call(fn)`: the aten ops (kernel launches on a GPU) one call dispatches.
- Training steps (``train_step.py``, ``profile_step.py``, ``scaling.py``): `STEP_CONFIGS`, `METHODS` (factories of
  fresh softprompt configs), `prepare_batch`, `training_steps(...)` -> both libraries' step callables (PEFT's
  configuration and weights from ``peft_reference.py``, shared with the tests),
  `default_implementation(device)`.
- `write_results(name, rows, machine, markdown_table)` -> writes ``benchmarks/results/<name>.json`` and ``.md``.
- `markdown_table(rows, columns)`, `line_chart(path, panels)` (matplotlib, Agg backend: no display needed).

Shapes: B batch, T tokens, C hidden, L layers, H heads, V vocab.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import softprompt

# The BLOOM sizes' (C, L, H) and V come from the library's table: one source of truth.
from softprompt.families.bloom import BLOOM_SHAPES, BLOOM_VOCAB_SIZE, bloom_config

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where `write_results` and the charts go."""


# ---------------------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Wall-clock timings of repeated calls, in seconds."""

    median: float
    """Median of `samples`: robust to the odd slow repeat."""
    spread: float
    """max(samples) - min(samples): how much the repeats disagree."""
    samples: list[float] = field(default_factory=list)
    """Every timed repeat, in order."""

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Timing":
        """Summarizes raw samples (seconds)."""
        samples = list(samples)
        return cls(statistics.median(samples), max(samples) - min(samples), samples)

    def __str__(self) -> str:
        return f"{self.median:.3f} s (spread {self.spread:.3f} s, n={len(self.samples)})"


def default_sync(device: torch.device | str) -> Callable[[], None]:
    """The function that waits for queued work on `device` (CUDA kernels run asynchronously), a no-op on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_function(
    fn: Callable[[], Any],
    warmup: int = 1,
    repeats: int = 5,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Times `fn()`.

    Args:
        fn: the work to time, called with no arguments.
        warmup: untimed calls first (allocator warm-up, lazy initialization, optimizer state, autotuning).
        repeats: timed calls.
        sync: called before starting and before stopping the clock (``torch.cuda.synchronize`` on CUDA); None for
            no synchronization (CPU).

    Returns:
        The `Timing` of the timed calls.
    """
    return time_alternating({"fn": fn}, warmup, repeats, sync)["fn"]


def time_alternating(
    fns: dict[str, Callable[[], Any]],
    warmup: int = 1,
    repeats: int = 5,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Times several functions, alternating them: repeat i of every function runs before repeat i + 1 of any.

    Args:
        fns: the contenders by name.
        warmup: untimed calls of each, also alternated.
        repeats: timed calls of each.
        sync: as in `time_function`.

    Returns:
        A `Timing` per name.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing.of(values) for name, values in samples.items()}


def wait_until_idle(busy_percent: float = 15.0, max_wait_s: float = 600.0, window_s: float = 3.0) -> float:
    """Waits until the rest of the machine is quiet: CPU use, all cores, below `busy_percent` over `window_s`.

    On a shared machine other processes' bursts distort CPU timings (two cores leave no slack); alternating the
    contenders spreads a burst over both, and starting idle makes one less likely. Gives up after `max_wait_s`.

    Returns:
        The CPU use (percent) of the last window.
    """
    import psutil

    deadline = time.monotonic() + max_wait_s
    busy = psutil.cpu_percent(interval=window_s)
    while busy > busy_percent and time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=window_s)
    return busy


# ---------------------------------------------------------------------------------------------------------- memory


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h


def _mallopt(option: int, value: int) -> bool:
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    try:
        return ctypes.CDLL(library).mallopt(option, value) == 1
    except (AttributeError, OSError):
        return False


@contextlib.contextmanager
def freed_memory_returned_to_os() -> Iterator[bool]:
    """Inside: glibc gives freed blocks of 64 KiB or more back to the OS at once (CPU memory measurement).

    glibc's malloc raises its mmap threshold dynamically (up to 32 MiB) and keeps freed heap memory for reuse, so
    the resident set size (RSS) of a process that once held a large tensor stays high after it is freed and the
    next allocation does not show. With a fixed 64 KiB threshold every tensor of 64 KiB or more is its own
    mapping, freed to the OS on release, and the RSS follows what is actually held.

    Only for measuring memory, never while timing: every such tensor then costs fresh page faults, which made a
    4-layer training step about 0.5 s (30%) slower here (2.8M page faults instead of 0.9M). On exit the thresholds
    are set where glibc's dynamic threshold ends up in a long run (mmap 32 MiB, trim 64 MiB): once set, glibc
    stops adjusting them itself.

    Yields:
        True when glibc accepted the setting (False on other C libraries, where the RSS is an upper bound).
    """
    accepted = _mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    if accepted:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    try:
        yield accepted
    finally:
        if accepted:
            _mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
            _mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


def _resident_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemory:
    """Measures the peak memory that the code inside ``with PeakMemory(device) as peak:`` adds, in bytes.

    - CUDA: ``torch.cuda.max_memory_allocated()`` minus what was allocated on entry (exact, allocator-level).
    - CPU: the peak resident set size (RSS) of the process minus the RSS on entry, sampled every
      `interval_s` seconds by a background thread (psutil). Enter `freed_memory_returned_to_os` first (as
      `measure_peak_memory` does) so that freed tensors leave the RSS; a peak shorter than the interval can be
      missed, but the tensors that set the peak (activations, logits) live for whole layers' worth of compute, much
      longer than a millisecond. It counts
      everything the step allocates (activations, gradients, optimizer state created during it), not Python objects
      alone as ``tracemalloc`` would (torch's CPU tensors bypass Python's allocator).

    Args:
        device: where the measured work runs.
        interval_s: CPU sampling period.

    Attributes:
        peak_bytes: set on exit.
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.001):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_bytes = 0
        self._max_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        self._start_bytes = self._max_bytes = _resident_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max_bytes = max(self._max_bytes, _resident_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc_info: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start_bytes
            return
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._max_bytes = max(self._max_bytes, _resident_bytes())
        self.peak_bytes = self._max_bytes - self._start_bytes


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Peak bytes added while `fn()` runs (see `PeakMemory`; on CPU inside `freed_memory_returned_to_os`)."""
    returned = freed_memory_returned_to_os() if torch.device(device).type == "cpu" else contextlib.nullcontext()
    with returned, PeakMemory(device) as peak:
        fn()
    return peak.peak_bytes


# ---------------------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> tuple[float, float, float] | None:
    """The system load average over 1, 5 and 15 minutes (None where the OS has none)."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a benchmark ran on: CPU, cores, torch threads, memory, GPU, library versions; call it when the run starts.

    Records ``load_average_before`` (other processes' load as the run starts); `write_results` adds
    ``load_average_after``.
    """
    import psutil

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "device": str(torch.device(device)),
        "gpu": None,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "triton": _version("triton"),
    }
    if torch.device(device).type == "cuda":
        properties = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = properties.name
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    info["load_average_before"] = load_average()
    return info


def matmul_peak_gflops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    repeats: int = 5,
) -> float:
    """The measured GEMM rate, GFLOP/s: the best of `repeats` square matmuls of `size` (2 * size^3 FLOPs each).

    Args:
        device: where to measure.
        dtype: fp32 on CPU; bf16 on CUDA for bf16 steps.
        size: matrix side; 2048 on CPU, 8192 on CUDA when None.
        repeats: timed matmuls (the best one counts: the peak, not the typical).
    """
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_function(lambda: a @ b, warmup=2, repeats=repeats, sync=default_sync(device))
    return 2 * size**3 / min(timing.samples) / 1e9


# ---------------------------------------------------------------------------------------------------------- models


def bloom_shape_config(shape: str = "560m", num_layers: int | None = None, vocab_size: int = BLOOM_VOCAB_SIZE):
    """A transformers `BloomConfig` of a published BLOOM shape.

    Args:
        shape: ``560m``, ``1b1``, ``1b7``, ``3b``, ``7b1`` (a ``bloom-``/``bloomz-`` prefix is accepted).
        num_layers: L, to cut the model to its first layers (None: all of them).
        vocab_size: V.

    Raises:
        ValueError: an unknown shape.
    """
    key = shape.removeprefix("bigscience/").removeprefix("bloomz-").removeprefix("bloom-")
    if key not in BLOOM_SHAPES:
        raise ValueError(f"shape={shape!r}: expected one of {sorted(BLOOM_SHAPES)}.")
    hidden_size, layers, heads = BLOOM_SHAPES[key]
    return bloom_config(hidden_size, num_layers or layers, heads, vocab_size)


def build_random_bloom(
    shape: str | Any = "560m",
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    vocab_size: int = BLOOM_VOCAB_SIZE,
) -> torch.nn.Module:
    """A `BloomForCausalLM` with random weights (transformers' own init, seeded), frozen, in eval mode.

    Args:
        shape: a BLOOM size name (see `bloom_shape_config`) or a ready `BloomConfig`.
        num_layers: cut to this many layers (ignored for a config).
        dtype: the weights' dtype.
        device: where the weights live.
        seed: the init seed; the global RNG is restored afterwards.
        vocab_size: V (ignored for a config).
    """
    from transformers import PretrainedConfig

    config = shape if isinstance(shape, PretrainedConfig) else bloom_shape_config(shape, num_layers, vocab_size)
    return build_random_model(config, dtype=dtype, device=device, seed=seed)


def build_random_model(
    config: Any,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> torch.nn.Module:
    """A causal LM of any supported family with random weights (transformers' own init, seeded), frozen, eval mode.

    Args:
        config: a transformers config, or a real model's name known offline (``Qwen/Qwen2.5-0.5B``, ...).
        num_layers: cut to the first this many layers (the per-layer ``layer_types`` too); None: all.
        dtype: the weights' dtype.
        device: where the weights live.
        seed: the init seed; the global RNG is restored afterwards.
    """
    import copy

    from transformers import AutoModelForCausalLM

    from softprompt.params import base_model_config

    config = base_model_config(config) if isinstance(config, str) else copy.deepcopy(config)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def random_batch(
    batch_size: int,
    num_tokens: int,
    vocab_size: int,
    num_label_tokens: int | None = 3,
    min_tokens: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    pad_token_id: int = 3,
) -> dict[str, torch.Tensor]:
    """A left-padded batch of random token ids, the seed classification recipe's layout.

    Args:
        batch_size: B.
        num_tokens: T, the padded length (the longest row).
        vocab_size: ids are drawn from ``[4, vocab_size)`` (no special ids).
        num_label_tokens: labels on each row's last tokens only (-100 elsewhere); None labels every real token.
        min_tokens: the shortest row; rows get lengths spread evenly between it and T. None: every row is full.
        device: where the tensors go.
        seed: id draw seed.
        pad_token_id: id put on padding.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``[B, T]``.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab_size, (batch_size, num_tokens), generator=generator)
    lengths = [num_tokens] * batch_size
    if min_tokens is not None and batch_size > 1:
        lengths = [round(min_tokens + (num_tokens - min_tokens) * row / (batch_size - 1)) for row in range(batch_size)]
    attention_mask = torch.zeros(batch_size, num_tokens, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, num_tokens - length :] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_token_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    if num_label_tokens is not None:
        labels[:, : num_tokens - num_label_tokens] = -100
    return {name: tensor.to(device) for name, tensor in
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}.items()}


# -------------------------------------------------------------------------------------------------- training steps


def narrow_config(family: str) -> Any:
    """The launch-bound configs' deep, narrow model: 24 layers of width 64 and a 4096-token vocabulary, where a
    small batch costs more in op launches than in arithmetic (a GPU's small-batch regime, on CPU)."""
    from transformers import LlamaConfig

    if family == "bloom":
        return bloom_config(64, 24, 4, vocab_size=4096)
    return LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=24,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


STEP_CONFIGS: dict[str, dict[str, Any]] = {
    "launch-bound": dict(model=narrow_config("bloom"), label="BLOOM 24 x 64 (V 4096)", device="cpu",
                         num_layers=None, dtype=torch.float32, batch_size=16, num_tokens=64, min_tokens=None),
    "launch-bound-llama": dict(model=narrow_config("llama"), label="Llama 24 x 64, 4 heads / 2 key-value (V 4096)",
                               device="cpu", num_layers=None, dtype=torch.float32, batch_size=16, num_tokens=64,
                               min_tokens=None),
    "cpu": dict(model="bigscience/bloomz-560m", device="cpu", num_layers=4, dtype=torch.float32, batch_size=8,
                num_tokens=64, min_tokens=None),
    "cpu-padded": dict(model="bigscience/bloomz-560m", device="cpu", num_layers=4, dtype=torch.float32,
                       batch_size=8, num_tokens=64, min_tokens=16, max_tokens=40),
    "cpu-qwen2.5": dict(model="Qwen/Qwen2.5-0.5B", device="cpu", num_layers=4, dtype=torch.float32, batch_size=8,
                        num_tokens=64, min_tokens=None),
    "gpu-16x64": dict(model="bigscience/bloomz-560m", device="cuda", num_layers=None, dtype=torch.bfloat16,
                      batch_size=16, num_tokens=64, min_tokens=None),
    "gpu-8x512": dict(model="bigscience/bloomz-560m", device="cuda", num_layers=None, dtype=torch.bfloat16,
                      batch_size=8, num_tokens=512, min_tokens=None),
}
"""The training-step configs of ``train_step.py`` and ``profile_step.py`` (its docstring describes them): a real
model's shape (known offline) with random weights, cut to ``num_layers`` (None: all), the weights' dtype, batch
``batch_size`` x ``num_tokens`` with rows of ``min_tokens``..``num_tokens`` real tokens (None: all full), or
``max_tokens`` at most."""

NUM_LABEL_TOKENS = 3
"""Labelled tokens at the end of each row in the training-step benchmarks."""

METHODS: dict[str, Callable[[], Any]] = {
    "prompt tuning (8)": lambda: softprompt.PromptTuningConfig(num_virtual_tokens=8),
    "p-tuning MLP (20, h=128)": lambda: softprompt.PromptEncoderConfig(
        num_virtual_tokens=20, encoder_hidden_size=128
    ),
    "prefix tuning (20)": lambda: softprompt.PrefixTuningConfig(num_virtual_tokens=20),
}
"""The benchmarked methods by label, each a factory of a fresh softprompt config (PEFT's:
`peft_reference.peft_config_for`)."""


def prepare_batch(setup: dict[str, Any], vocab_size: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A `STEP_CONFIGS` entry's batch: random ids, left-padded, the last NUM_LABEL_TOKENS real tokens labelled."""
    batch = random_batch(
        setup["batch_size"], setup["num_tokens"], vocab_size, NUM_LABEL_TOKENS,
        min_tokens=setup["min_tokens"], device=device, seed=0,
    )
    if setup.get("max_tokens"):  # rows of min..max real tokens in a batch padded to num_tokens
        keep = setup["num_tokens"] - setup["max_tokens"]
        batch["attention_mask"][:, :keep] = 0
        batch["input_ids"][:, :keep] = 3
        batch["labels"][:, :keep] = -100
    return batch


def default_implementation(device: torch.device | str) -> str:
    """`compute_loss`'s implementation by device: ``triton`` on CUDA, ``torch`` elsewhere."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


def training_steps(
    base: torch.nn.Module,
    config: Any,
    batch: dict[str, torch.Tensor],
    implementation: str,
    virtual_token_layout: str = "auto",
    compile_mode: str | None = None,
    compile_peft: bool = False,
    lr: float = 1e-3,
) -> tuple[dict[str, Callable[[], float]], str]:
    """One training step (zero_grad, forward, backward, AdamW step) of each library, on the same frozen `base`.

    softprompt's step is ``SoftPromptModel(base, config).compute_loss(**batch, ...)``; PEFT's is
    ``get_peft_model(base, peft_config)(**batch).loss``, its documented training call. Both adapters start from
    the same weights (seed 0, `peft_reference.peft_twin`).

    Args:
        base: the frozen base model, shared (one copy of the weights).
        config: a softprompt config.
        batch: ``input_ids``, ``attention_mask``, ``labels``.
        implementation: `compute_loss`'s (see `default_implementation`).
        virtual_token_layout: `compute_loss`'s (prompt tuning, p-tuning).
        compile_mode: torch.compile softprompt's decoder passes with this mode (None: eager).
        compile_peft: with `compile_mode`, compile PEFT's forward too.
        lr: AdamW's learning rate.

    Returns:
        ``{"softprompt": step, "PEFT": step}``, each step returning its loss (the models and optimizers live in
        them), and the virtual-token layout softprompt's step runs (what ``"auto"`` chose).
    """
    from peft_reference import peft_twin

    torch.manual_seed(0)
    ours = softprompt.SoftPromptModel(base, config)
    theirs = peft_twin(ours, base, share_base=True).train()
    if compile_mode:
        ours.compile_decoder(mode=compile_mode, dynamic=False)
        if compile_peft:
            theirs.forward = torch.compile(theirs.forward, mode=compile_mode, dynamic=False)
    our_optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=lr)
    their_optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=lr)

    def our_step() -> float:
        if compile_mode:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier graph outputs are dead
        our_optimizer.zero_grad(set_to_none=True)
        loss = ours.compute_loss(**batch, implementation=implementation, virtual_token_layout=virtual_token_layout)
        loss.backward()
        our_optimizer.step()
        return loss.item()

    def their_step() -> float:
        if compile_mode and compile_peft:
            torch.compiler.cudagraph_mark_step_begin()
        their_optimizer.zero_grad(set_to_none=True)
        loss = theirs(**batch).loss
        loss.backward()
        their_optimizer.step()
        return loss.item()

    layout = virtual_token_layout
    if layout == "auto":
        from softprompt.training_loss import layout_for

        layout = layout_for(ours.frozen, ours.row_layout(batch["input_ids"].shape[0], None), batch["input_ids"].device)
    return {"softprompt": our_step, "PEFT": their_step}, layout


class _OpCounter:
    """Counts the aten ops dispatched while active (every op of the forward, the backward and the optimizer step:
    each is one kernel launch on a GPU)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count = 0
        self.mode = Mode()


def ops_per_call(fn: Callable[[], Any]) -> int:
    """How many aten ops one call of `fn` dispatches (`_OpCounter`)."""
    counter = _OpCounter()
    with counter.mode:
        fn()
    return counter.count


# ---------------------------------------------------------------------------------------------------------- results


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of `rows` (floats with 3 significant decimals, ints with thousands separators)."""
    columns = list(columns or (rows[0].keys() if rows else []))

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "NO"
        if isinstance(value, int):
            return f"{value:,d}"
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_markdown(machine: dict[str, Any]) -> str:
    """The machine dict as a Markdown bullet list."""
    return "\n".join(f"- {key}: {value}" for key, value in machine.items() if value is not None)


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    machine: dict[str, Any],
    markdown_table: str,
    extra: dict[str, Any] | None = None,
    command: str | None = None,
) -> tuple[Path, Path]:
    """Writes ``benchmarks/results/<name>.json`` (everything) and ``<name>.md`` (table, command, machine).

    Args:
        name: file stem, e.g. ``train_step_cpu``.
        rows: the result rows (JSON-serializable dicts).
        machine: `machine_info` (taken when the run started); ``load_average_after`` is added here unless it
            holds one.
        markdown_table: the table for humans (see the `markdown_table` function).
        extra: further JSON fields (configuration, notes).
        command: the command that produced the results, recorded in both files.

    Returns:
        The two paths written.
    """
    machine = dict(machine)
    machine.setdefault("load_average_after", load_average())  # a rewritten result keeps its own
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md"
    payload = {"name": name, "command": command, "machine": machine, **(extra or {}), "rows": list(rows)}
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    parts = [f"# {name}", ""]
    if command:
        parts += ["```", command, "```", ""]
    parts += [markdown_table, "", "Machine:", "", machine_markdown(machine), ""]
    md_path.write_text("\n".join(parts))
    return json_path, md_path


@dataclass
class Panel:
    """One chart panel: named series of (x, y) points."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]]
    logx: bool = False
    logy: bool = False


def line_chart(path: Path | str, panels: Sequence[Panel], suptitle: str | None = None) -> Path:
    """Draws `panels` side by side into a PNG (matplotlib's Agg backend: no display needed).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for label, (xs, ys) in panel.series.items():
            axis.plot(xs, ys, marker="o", label=label)
        axis.set_title(panel.title)
        axis.set_xlabel(panel.xlabel)
        axis.set_ylabel(panel.ylabel)
        if panel.logx:
            axis.set_xscale("log")
        if panel.logy:
            axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend()
    if suptitle:
        figure.suptitle(suptitle)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
