"""`TrainConfig`: every setting of a training run, typed, documented and validated in one place.

The ``softprompt train`` flags are these field names with dashes (``--learning-rate`` is ``learning_rate``); a
config file (YAML or JSON) holds the same names, with dashes or underscores. Precedence: the defaults below, then
the config file, then the flags.

The defaults reproduce the seed guides (PEFT's prompt-based-methods guide on twitter_complaints: learning rate
3e-2, batch 8, max_length 64, 8 virtual tokens for prompt tuning and 20 for p-tuning and prefix tuning) on the data
and model that ship with the package, so ``softprompt train`` with no flags runs offline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.methods import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning")
"""The ``--method`` choices."""

DEFAULT_NUM_VIRTUAL_TOKENS = {"prompt-tuning": 8, "p-tuning": 20, "prefix-tuning": 20}
"""The seed guides' virtual-token counts, used when ``num_virtual_tokens`` is None."""

DEFAULT_TEXT_COLUMN = "Tweet text"
"""Text column of the shipped complaints dataset (the default data)."""

DEFAULT_LABEL_COLUMN = "text_label"
"""Label column of the shipped complaints dataset (the default data)."""

SEED_PROMPT_TUNING_INIT_TEXT = "Classify if the tweet is a complaint or not:"
"""The seed guide's TEXT init for prompt tuning on twitter complaints."""

PADDING_CHOICES = ("longest", "max_length")
MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
BASE_DTYPE_CHOICES = ("float32", "bfloat16", "float16")
LOSS_IMPLEMENTATION_CHOICES = ("torch", "triton", "full")
VIRTUAL_TOKEN_LAYOUT_CHOICES = ("prefix", "sequence")
COMPILE_CHOICES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Fields that may differ between a run and its --resume: they change where output goes or what is printed, never
# the numbers the run computes.
RESUME_FREE_FIELDS = frozenset({"resume", "overwrite", "num_generations", "progress", "keep_last", "save_every"})
# Fields that say where a run executes. They may change at --resume too, so that a run can move to another machine,
# but they can change floating-point rounding (another device, another split of the BLAS work over threads): the
# bit-for-bit equality with an uninterrupted run holds only while they stay the same.
RESUME_PLACEMENT_FIELDS = frozenset({"device", "num_threads"})


class ConfigError(ValueError):
    """A configuration value (or config file) cannot be used; the message names it, what was expected and the fix."""


@dataclass
class TrainConfig:
    """One training run. Every field is a ``softprompt train`` flag (``--field-name``)."""

    # --- model and method --------------------------------------------------------------------------------------
    model: str | None = None
    """Base model: a hub id (``bigscience/bloomz-560m``) or a local directory, loaded with
    ``AutoModelForCausalLM.from_pretrained``. None: the embedded tiny BLOOM (random weights, built locally, saved
    into ``output_dir/base-model`` so that ``softprompt eval/generate`` can reload it)."""

    method: str = "prompt-tuning"
    """``prompt-tuning``, ``p-tuning`` or ``prefix-tuning``."""

    num_virtual_tokens: int | None = None
    """Virtual tokens (prefix length). None: the seed guides' 8 for prompt tuning, 20 for the others."""

    prompt_tuning_init: str | None = None
    """Prompt tuning only: ``RANDOM``, ``TEXT`` or ``SAMPLE_VOCAB`` (PEFT's names). None: ``TEXT`` when
    ``prompt_tuning_init_text`` is given; on the shipped default data, the seed guide's ``TEXT`` init with
    `SEED_PROMPT_TUNING_INIT_TEXT`; otherwise ``RANDOM`` (PEFT's default)."""

    prompt_tuning_init_text: str | None = None
    """Prompt tuning with ``TEXT`` init: the text whose token embeddings start the table."""

    encoder_reparameterization_type: str = "MLP"
    """P-tuning only: ``MLP`` or ``LSTM``."""

    encoder_hidden_size: int | None = None
    """P-tuning encoder width, or prefix-projection width. None: the base model's hidden size (PEFT's default)."""

    encoder_num_layers: int = 2
    """P-tuning LSTM layers."""

    encoder_dropout: float = 0.0
    """P-tuning LSTM dropout."""

    prefix_projection: bool = False
    """Prefix tuning only: train a ``[P, C]`` table through an MLP instead of the keys/values directly."""

    base_dtype: str = "float32"
    """dtype the frozen base is loaded in: ``float32``, ``bfloat16`` or ``float16``. The prompts stay fp32."""

    # --- data --------------------------------------------------------------------------------------------------
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
    """Fraction of the training rows held out for evaluation when ``eval_split`` is None; 0 turns evaluation
    off."""

    text_column: list[str] = field(default_factory=list)
    """Text column; one name for all datasets or one per dataset. Empty: ``Tweet text`` for the shipped default
    data; required otherwise."""

    label_column: str | None = None
    """Label column: given, the classification-as-generation recipe; None, the causal-LM recipe on the text. With
    the shipped default data and no text column given: ``text_label``."""

    task_column: str | None = None
    """Column naming each row's task: one adapter per distinct value, saved as ``output_dir/adapters/<task>``."""

    max_length: int = 64
    """Most tokens per example (prompt + label + EOS for classification)."""

    padding: str = "longest"
    """``longest`` (pad each batch to its longest row) or ``max_length`` (the seed's fixed shape)."""

    # --- optimization ------------------------------------------------------------------------------------------
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

    mixed_precision: str = "auto"
    """CUDA autocast: ``auto`` (bf16 where supported, else fp16), ``bf16``, ``fp16`` or ``no``. Always ``no`` on
    CPU."""

    loss_implementation: str = "torch"
    """``SoftPromptModel.compute_loss`` implementation: ``torch``, ``triton`` or ``full``."""

    virtual_token_layout: str = "prefix"
    """How the training loss feeds prompt-tuning / p-tuning virtual tokens (`SoftPromptModel.compute_loss`):
    ``prefix`` (computed once per adapter, fewer FLOPs) or ``sequence`` (in front of every row, one decoder pass;
    for GPU steps bound by kernel launches when not compiling)."""

    compile: str | None = None
    """``torch.compile`` mode for the frozen decoder's passes in the training loss
    (`SoftPromptModel.compile_decoder`): None (eager), ``default``, ``reduce-overhead`` (CUDA graphs),
    ``max-autotune`` or ``max-autotune-no-cudagraphs``.
    On a GPU, ``reduce-overhead`` made a bloomz-560m step at batch 16 x 64 about 3x faster (benchmarks/results);
    each new batch shape compiles first (seconds to minutes), so it pays off over long runs."""

    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``."""

    num_threads: int | None = None
    """CPU threads for torch during the run. None: 1 for the embedded tiny model (its matrices are too small to
    gain from threads, and idle threads spinning on a busy machine slow every step), torch's default otherwise."""

    seed: int = 0
    """Seeds the prompt initialization, the held-out split and the data order: a run is reproducible on CPU."""

    # --- output ------------------------------------------------------------------------------------------------
    output_dir: str | None = None
    """Where adapter, metrics, plot and checkpoints go. None: ``softprompt-runs/<method>``."""

    save_every: int = 100
    """Write a checkpoint every this many optimizer steps (0: only at epoch ends, which always get one)."""

    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""

    resume: bool = False
    """Continue from the newest complete checkpoint in ``output_dir`` (starts fresh when there is none)."""

    overwrite: bool = False
    """Start over even if ``output_dir`` holds a previous run's checkpoints (they are deleted)."""

    num_generations: int = 4
    """Held-out examples generated at the end and reported (0: none)."""

    progress: bool = True
    """Show tqdm progress bars."""

    def __post_init__(self) -> None:
        self.dataset = _as_list(self.dataset, "dataset")
        self.text_column = _as_list(self.text_column, "text_column")
        _check_choice("method", self.method, METHODS)
        _check_choice("padding", self.padding, PADDING_CHOICES)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_CHOICES)
        _check_choice("device", self.device, DEVICE_CHOICES)
        _check_choice("base_dtype", self.base_dtype, BASE_DTYPE_CHOICES)
        _check_choice("loss_implementation", self.loss_implementation, LOSS_IMPLEMENTATION_CHOICES)
        _check_choice("virtual_token_layout", self.virtual_token_layout, VIRTUAL_TOKEN_LAYOUT_CHOICES)
        if self.compile is not None:
            _check_choice("compile", self.compile, COMPILE_CHOICES)
        for name in ("max_length", "num_epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps",
                     "keep_last"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "save_every", "num_generations", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.num_threads is not None:
            _check_int("num_threads", self.num_threads, minimum=1)
        _check_float("learning_rate", self.learning_rate, positive=True)
        _check_float("weight_decay", self.weight_decay, positive=False)
        _check_float("max_grad_norm", self.max_grad_norm, positive=False)
        _check_float("eval_fraction", self.eval_fraction, positive=False)
        if not self.eval_fraction < 1:
            raise ConfigError(
                f"eval_fraction={self.eval_fraction!r}: expected a fraction in [0, 1) of the rows to hold out. "
                "Fix: pass e.g. --eval-fraction 0.2 (or 0 to skip evaluation)."
            )
        for name in ("resume", "overwrite", "prefix_projection", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected true or false.")
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume=True and overwrite=True: one continues the run in output_dir, the other deletes it. "
                "Fix: pass only one of --resume / --overwrite."
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
        if self.method != "prompt-tuning" and self.prompt_tuning_init not in (None, "RANDOM", "random"):
            raise ConfigError(
                f"prompt_tuning_init={self.prompt_tuning_init!r} with method={self.method!r}: the init applies to "
                "prompt tuning only. Fix: drop --prompt-tuning-init or use --method prompt-tuning."
            )
        self.adapter_config()  # the method's own validation, with its own messages

    # ------------------------------------------------------------------ derived values

    @property
    def uses_embedded_model(self) -> bool:
        """True when the base is the embedded tiny BLOOM (no ``model`` given)."""
        return self.model is None

    @property
    def uses_default_data(self) -> bool:
        """True when the data is the shipped complaints.csv (no ``dataset`` given)."""
        return not self.dataset

    @property
    def resolved_output_dir(self) -> Path:
        """``output_dir``, or ``softprompt-runs/<method>`` when None."""
        return Path(self.output_dir) if self.output_dir is not None else Path("softprompt-runs") / self.method

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

    def adapter_config(self) -> PromptTuningConfig | PromptEncoderConfig | PrefixTuningConfig:
        """The method's configuration (PEFT field names) built from these settings.

        Raises:
            ValueError: a method field is invalid (the method config's own message).
        """
        num_virtual_tokens = self.num_virtual_tokens or DEFAULT_NUM_VIRTUAL_TOKENS[self.method]
        if self.num_virtual_tokens is not None:
            _check_int("num_virtual_tokens", self.num_virtual_tokens, minimum=1)
        if self.method == "prompt-tuning":
            init, init_text = self.prompt_tuning_init, self.prompt_tuning_init_text
            if init is None:
                seed_guide = self.uses_default_data and self.resolved_label_column is not None
                init = "TEXT" if seed_guide or init_text else "RANDOM"
                if seed_guide and init_text is None:
                    init_text = SEED_PROMPT_TUNING_INIT_TEXT
            return PromptTuningConfig(
                num_virtual_tokens=num_virtual_tokens, prompt_tuning_init=init, prompt_tuning_init_text=init_text
            )
        if self.method == "p-tuning":
            return PromptEncoderConfig(
                num_virtual_tokens=num_virtual_tokens,
                encoder_reparameterization_type=self.encoder_reparameterization_type,
                encoder_hidden_size=self.encoder_hidden_size,
                encoder_num_layers=self.encoder_num_layers,
                encoder_dropout=self.encoder_dropout,
            )
        return PrefixTuningConfig(
            num_virtual_tokens=num_virtual_tokens,
            encoder_hidden_size=self.encoder_hidden_size,
            prefix_projection=self.prefix_projection,
        )

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        """Every field name, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Builds a config from field values; keys may use dashes (``learning-rate``) or underscores.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones), or an invalid value.
        """
        return cls(**normalize_keys(values, source))

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Reads a YAML or JSON config file; ``overrides`` (e.g. command-line flags) win over its values.

        Raises:
            ConfigError: the file is missing or unreadable, not a mapping, or has unknown keys or invalid values.
        """
        values = read_config_file(path)
        values.update(normalize_keys(overrides or {}, "flags"))
        return cls.from_dict(values, str(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml``/``.json`` file, keys normalized to field names.

    Raises:
        ConfigError: missing file, unsupported extension, parse error, not a mapping, or unknown keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist. Fix: check the path passed to --config.")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(
            f"Config file {str(path)!r} has the extension {suffix!r}: expected .yaml, .yml or .json. "
            "Fix: rename it or convert it."
        )
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as error:  # yaml and json raise different types; both mean "cannot parse"
        raise ConfigError(f"Config file {str(path)!r} cannot be parsed: {error}. Fix: correct its syntax.") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"Config file {str(path)!r} holds a {type(values).__name__}: expected a mapping of field names to "
            "values, e.g. `learning_rate: 0.03`."
        )
    return normalize_keys(values, str(path))


def normalize_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Maps ``learning-rate`` / ``learning_rate`` keys to field names; unknown keys raise a ConfigError."""
    known = set(TrainConfig.field_names())
    normalized = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(
                f"{source}: unknown setting {key!r}. Expected one of: {', '.join(sorted(known))}."
            )
        normalized[name] = value
    return normalized


def adapter_name_for_source(source: str) -> str:
    """The adapter name a data source gets in multi-dataset training: file stem or the hub name's last part."""
    path = Path(source)
    stem = path.stem if path.suffix else source.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "dataset"


def _as_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ConfigError(f"{name}={value!r}: expected a string or a list of strings.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}. Fix: pick one of those.")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{name}={value!r}: expected an integer >= {minimum}. Fix: pass e.g. --{name.replace('_', '-')} "
            f"{max(minimum, 1)}."
        )


def _check_float(name: str, value: Any, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
        positive and value == 0
    ):
        kind = "a positive" if positive else "a non-negative"
        raise ConfigError(f"{name}={value!r}: expected {kind} finite number. Fix: pass e.g. --{name.replace('_', '-')} 0.03.")


__all__ = [
    "ConfigError",
    "METHODS",
    "TrainConfig",
    "adapter_name_for_source",
    "read_config_file",
]
