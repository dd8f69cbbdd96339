"""CPT, Context-aware Prompt Tuning: in-context examples as the prompt, their embeddings refined within small balls.

Blau, Kimhi, Belinkov, Bronstein and Baskin, "Context-aware Prompt Tuning: Advancing In-Context Learning with
Adversarial Methods" (2024, arXiv:2410.17222).

The method in one sentence: put k labelled training examples in front of the input, as in in-context learning, and
learn a small change ``delta`` of their token embeddings, kept inside an L2 ball around each token's frozen
embedding (projected gradient descent, as in adversarial training but minimizing the loss), while the model is also
trained to predict the examples' own labels.

The context is ``cpt_token_ids`` (P tokens), each with a type in ``cpt_tokens_type_mask``; example k (from 0) uses
``4k+1`` for its input template, ``4k+2`` its input text, ``4k+3`` its output template and ``4k+4`` its label tokens
(0: separators, padding). Only ``type % 4`` and ``type > 0`` matter:

- the virtual tokens are ``embedding [P, C]`` (the frozen embeddings of the context ids) ``+ delta [P, C]`` (zeros
  at the start; the only trained tensor);
- label tokens (and type 0) never move: their delta gets no gradient (and a radius of 1e-10);
- every delta row lives in a ball of radius ``epsilon * sqrt(C / 2048)``: ``opt_projection_format_epsilon`` for
  templates, ``opt_projection_epsilon`` for input text. A row outside is scaled back onto the ball:
  ``delta_i <- delta_i * eps_i / max(|delta_i|, eps_i)``;
- the loss covers the input's labels and the context's label tokens (each predicted by the position before it),
  optionally weighted: with ``opt_weighted_loss_type="decay"``, the input's labels weigh 1 and the context examples'
  labels ``g, g^2, ...`` from the newest (highest type) to the oldest (``g = opt_loss_decay_factor``). Like PEFT, the
  loss is the mean of weight * cross-entropy over the labelled positions (not divided by the weights' sum).

How it enters the model: as virtual tokens (prompt tuning's way, ``softprompt/methods/prompt_tuning.py``) that carry
their own labels: `enter` returns `softprompt.entries.VirtualTokens` with ``targets`` (the label tokens' ids, -100
elsewhere) and ``weights`` (the decay), which every route scores like the text's labels. `reference_forward` writes
the whole loss out the PEFT way.

When the projection runs: PEFT projects lazily, at the start of every forward (the optimizer's step leaves delta
outside its ball until then). softprompt does the same (`CPTEmbedding.forward`), so that any training loop gives
PEFT's trajectory, and its training loop also projects right after every optimizer step
(`MethodSpec.after_optimizer_step`), so that the deltas it checkpoints and saves are inside their balls. A loop of
your own can call ``model.prompts[name].project_()`` after ``optimizer.step()`` for the same.

Where softprompt differs from PEFT on purpose:

- The input's loss positions are its labels (-100 where no loss is wanted); there is no ``input_type_mask``. PEFT
  also drops the input's labels unless the shifted default type is a label type (``max(cpt_tokens_type_mask)`` a
  multiple of 4): with its default all-1 type mask PEFT's loss is NaN (a mean over nothing), softprompt's the
  input's cross-entropy. PEFT also adds ``max(cpt_tokens_type_mask)`` in place to a caller's ``input_type_mask``.
- PEFT's loss reads the config of the adapter named ``default`` (any other name fails with ``KeyError``); here
  every adapter uses its own config, under any name.
- ``num_virtual_tokens`` is derived (one per context token); PEFT overwrites any value given, softprompt refuses one
  that differs. ``cpt_token_ids`` None means PEFT's one-token context ``[0]``, except in ``softprompt train``, which
  builds the context from the training data (`softprompt.training.method_data`).
- The types, ids, radii and decay are validated (PEFT treats an unknown loss type as ``none``).
- A PEFT adapter stores only ``embedding + delta``; loaded, it becomes the frozen embedding with a zero delta (as in
  PEFT), so further training moves in balls around the loaded prompt. softprompt's format keeps both tensors.

Shapes: B batch, T tokens, P context tokens (virtual tokens), C embedding width, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from softprompt.entries import EntryRequest, VirtualTokens
from softprompt.families import family_of
from softprompt.families.family import BaseModelShape
from softprompt.loss import IGNORE_INDEX
from softprompt.methods.prompt_tuning import reference_forward as prompt_tuning_reference_forward
from softprompt.methods.spec import MethodSpec, Paper, from_prompt_embeddings

MIN_EPSILON = 1e-10
"""The radius of label and type-0 rows (PEFT's): they never move."""

REFERENCE_WIDTH = 2048
"""The radii scale with sqrt(C / 2048) (PEFT's rule): a delta whose coordinates have the same size has a norm
proportional to sqrt(C), so one epsilon means the same per-coordinate change at every width."""

WeightedLossType = Literal["none", "decay"]


@dataclass
class CPTConfig:
    """Configuration of CPT; a PEFT user switches by changing the import."""

    cpt_token_ids: list[int] | None = None
    """The context's token ids (the in-context examples); one virtual token each. None: PEFT's ``[0]``."""

    cpt_mask: list[int] | None = None
    """One entry per context token; recorded for PEFT compatibility (PEFT checks its length and never reads it).
    None: all 1."""

    cpt_tokens_type_mask: list[int] | None = None
    """Each context token's type (``4k+1`` input template, ``4k+2`` input, ``4k+3`` output template, ``4k+4`` label
    of example k; 0 none). None: all 1."""

    opt_weighted_loss_type: WeightedLossType = "none"
    """``none`` (every loss term weighs 1) or ``decay`` (older context examples' labels weigh less)."""

    opt_loss_decay_factor: float = 1.0
    """g: with ``decay``, the newest context example's labels weigh g and each older one g times less (the input's
    labels weigh 1)."""

    opt_projection_epsilon: float = 0.1
    """The ball radius of input-text tokens, before the sqrt(C / 2048) scaling."""

    opt_projection_format_epsilon: float = 0.1
    """The ball radius of template (format) tokens, before the sqrt(C / 2048) scaling."""

    tokenizer_name_or_path: str | None = None
    """Recorded for PEFT compatibility (unused there too)."""

    num_virtual_tokens: int | None = None
    """P, derived: one virtual token per context token. Given, it must equal ``len(cpt_token_ids)``."""

    method: ClassVar[str] = "cpt"

    def __post_init__(self) -> None:
        lists = {"cpt_token_ids": self.cpt_token_ids, "cpt_mask": self.cpt_mask,
                 "cpt_tokens_type_mask": self.cpt_tokens_type_mask}
        for name, values in lists.items():
            if values is None:
                continue
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not values or not all(
                    isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in values):
                raise ValueError(
                    f"{name}={values!r}: expected a non-empty list of ints >= 0. Fix: e.g. cpt_token_ids=[101, 7, 9] "
                    "with cpt_tokens_type_mask=[1, 2, 4] (types: 4k+1 input template, 4k+2 input, 4k+3 output "
                    "template, 4k+4 label of example k)."
                )
            setattr(self, name, list(values))
        if self.cpt_token_ids is None and (self.cpt_mask is not None or self.cpt_tokens_type_mask is not None):
            raise ValueError(
                "cpt_mask or cpt_tokens_type_mask without cpt_token_ids: a mask describes the context's tokens. Fix: "
                "pass cpt_token_ids too, or drop the masks."
            )
        lengths = {name: len(values) for name, values in lists.items() if values is not None}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"cpt_token_ids, cpt_mask and cpt_tokens_type_mask have lengths {lengths}: expected one entry per "
                "context token in each (PEFT's rule). Fix: give them the same length."
            )
        length = len(self.context_token_ids)
        if self.num_virtual_tokens is not None and self.num_virtual_tokens != length:
            raise ValueError(
                f"num_virtual_tokens={self.num_virtual_tokens!r} with {length} context token(s): CPT has one virtual "
                "token per context token (PEFT silently overwrites the value). Fix: drop num_virtual_tokens "
                "(--num-virtual-tokens)."
            )
        self.num_virtual_tokens = length
        if self.opt_weighted_loss_type not in ("none", "decay"):
            raise ValueError(
                f"opt_weighted_loss_type={self.opt_weighted_loss_type!r}: expected 'none' or 'decay' (PEFT treats "
                "anything else as 'none'). Fix: pick one of those."
            )
        for name in ("opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value!r}: expected a positive finite number. Fix: pass e.g. {name}=0.1.")
        if self.tokenizer_name_or_path is not None and not isinstance(self.tokenizer_name_or_path, str):
            raise ValueError(f"tokenizer_name_or_path={self.tokenizer_name_or_path!r}: expected a string or None.")

    @property
    def context_token_ids(self) -> list[int]:
        """``cpt_token_ids``, or PEFT's default context ``[0]``."""
        return self.cpt_token_ids if self.cpt_token_ids is not None else [0]

    @property
    def context_types(self) -> list[int]:
        """``cpt_tokens_type_mask``, or PEFT's default: every token type 1 (an input template, no label)."""
        return self.cpt_tokens_type_mask if self.cpt_tokens_type_mask is not None else [1] * self.num_virtual_tokens


def is_label(types: torch.Tensor) -> torch.Tensor:
    """Which types are label tokens: positive multiples of 4."""
    return (types > 0) & (types % 4 == 0)


def is_trainable(types: torch.Tensor) -> torch.Tensor:
    """Which types may move: templates and input text, ``type % 4`` in 1, 2, 3 (PEFT's gradient mask); labels and
    type 0 may not."""
    return types % 4 != 0


def ball_radii(config: CPTConfig, embedding_width: int) -> torch.Tensor:
    """``[P]`` fp32 each context token's radius, computed as PEFT computes it (fp32 throughout)."""
    types = torch.tensor(config.context_types)
    scale = torch.sqrt(torch.tensor([embedding_width / REFERENCE_WIDTH], dtype=torch.float32))  # [1]
    radii = torch.full((len(types),), MIN_EPSILON, dtype=torch.float32)
    positive = types > 0
    radii[positive & ((types % 4 == 1) | (types % 4 == 3))] = config.opt_projection_format_epsilon * scale
    radii[positive & (types % 4 == 2)] = config.opt_projection_epsilon * scale
    return radii


def context_targets(config: CPTConfig) -> torch.Tensor:
    """``[P]`` the context's own labels: the token id where the type is a label type, -100 elsewhere."""
    types = torch.tensor(config.context_types)
    return torch.tensor(config.context_token_ids).masked_fill(~is_label(types), IGNORE_INDEX)


def context_weights(config: CPTConfig) -> torch.Tensor | None:
    """``[P]`` the loss weight of each context label (``decay``), or None (``none``: all 1).

    PEFT ranks the label types of a row's label positions (from the second on), the input's shifted type first:
    the input weighs 1, then each context example's label type, newest (highest) first, ``g`` times the one before.
    """
    if config.opt_weighted_loss_type != "decay":
        return None
    types = config.context_types
    label_types = sorted({t for t in types[1:] if t > 0 and t % 4 == 0}, reverse=True)  # position 0 is never scored
    weight_of, weight = {}, 1.0
    for label_type in label_types:
        weight *= config.opt_loss_decay_factor  # repeated products, as PEFT computes them (the input's weight is 1)
        weight_of[label_type] = weight
    return torch.tensor([weight_of.get(t, 1.0) for t in types], dtype=torch.float32)


class CPTEmbedding(nn.Module):
    """The context's frozen embeddings ``[P, C]`` and the trained ``delta [P, C]``.

    The names are PEFT's (``embedding.weight``, frozen; ``delta_embedding.weight``), so that state dicts move
    between the two libraries under ``prompt_encoder.<adapter>.``; both count as the adapter's parameters, only the
    delta as trainable (PEFT's counts).

    Args:
        config: the configuration.
        embedding_width: C, the width of the base model's input embeddings.
        context_embeddings: ``[P, C]`` the frozen embeddings of the context tokens, or None (a structure about to
            receive stored weights).
    """

    def __init__(self, config: CPTConfig, embedding_width: int, context_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        num_virtual = config.num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual, embedding_width)
        if context_embeddings is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(context_embeddings.float())
        self.embedding.weight.requires_grad_(False)
        self.delta_embedding = nn.Embedding(num_virtual, embedding_width)
        with torch.no_grad():
            self.delta_embedding.weight.zero_()
        types = torch.tensor(config.context_types)
        # Not persistent: they follow from the config, and PEFT's state dict has no such tensors.
        self.register_buffer("radii", ball_radii(config, embedding_width), persistent=False)  # [P]
        self.register_buffer("movable", is_trainable(types)[:, None], persistent=False)  # [P, 1]

    def requires_grad_(self, requires_grad: bool = True) -> "CPTEmbedding":
        """Makes the delta trainable or frozen; the context's own embeddings stay frozen either way."""
        super().requires_grad_(requires_grad)
        self.embedding.weight.requires_grad_(False)
        return self

    def projection(self) -> torch.Tensor:
        """``[P, C]`` the delta projected into its balls (a new tensor; nothing changes)."""
        with torch.no_grad():
            delta = self.delta_embedding.weight
            norms = torch.linalg.vector_norm(delta, dim=1)  # [P]
            radii = self.radii.to(delta.dtype)
            scale = torch.where(norms > 0, radii / torch.maximum(norms, radii), torch.ones_like(norms))
            return delta * scale[:, None]

    def project_(self) -> None:
        """Projects the delta into its balls, in place (the projected-gradient step after each update)."""
        with torch.no_grad():
            self.delta_embedding.weight.copy_(self.projection())

    def forward(self) -> torch.Tensor:
        """``[P, C]`` the virtual tokens: frozen embeddings + the projected delta (projected in place first, as
        PEFT's forward does); label and type-0 rows pass no gradient to the delta."""
        self.project_()
        delta = self.delta_embedding.weight
        delta = torch.where(self.movable, delta, delta.detach())  # PEFT's gradient mask, without a hook
        return self.embedding.weight + delta


def empty(config: CPTConfig, shape: BaseModelShape) -> CPTEmbedding:
    """The module's structure, about to receive stored weights."""
    return CPTEmbedding(config, shape.embedding_width)


def build(config: CPTConfig, base_model: PreTrainedModel, tokenizer: Any | None = None) -> CPTEmbedding:
    """The module: the frozen embeddings of the context tokens (through the base's embedding module, so Gemma's
    scale is included, as in PEFT), a zero delta, on the base's device.

    Raises:
        ValueError: a context token id outside the base's vocabulary.
    """
    shape = family_of(base_model.config).shape(base_model.config)
    word_embeddings = base_model.get_input_embeddings()
    device = word_embeddings.weight.device
    token_ids = config.context_token_ids
    outside = sorted({token for token in token_ids if token >= shape.vocab_size})
    if outside:
        raise ValueError(
            f"cpt_token_ids holds {outside}: expected ids in [0, {shape.vocab_size}), the base model's vocabulary. "
            "Fix: build the context with the base model's own tokenizer."
        )
    with torch.no_grad():
        context = word_embeddings(torch.tensor(token_ids, device=device)).float()  # [P, C]
    with torch.device(device):
        return CPTEmbedding(config, shape.embedding_width, context)


def from_table(config: CPTConfig, shape: BaseModelShape, table: torch.Tensor) -> CPTEmbedding:
    """PEFT's saved prompt (embedding + delta) as the frozen embeddings, with a zero delta (PEFT's own loading)."""
    return CPTEmbedding(config, shape.embedding_width, table)


def enter(module: nn.Module, request: EntryRequest) -> VirtualTokens:
    """The context as virtual tokens of every row, with its label tokens' ids and weights as their own labels."""
    if not isinstance(module, CPTEmbedding):  # a stored output alone (inference): a plain table, no labels
        return VirtualTokens(module().unsqueeze(0))
    prompt = module()  # [P, C]
    device = prompt.device
    weights = context_weights(module.config)
    return VirtualTokens(prompt.unsqueeze(0), targets=context_targets(module.config).to(device).unsqueeze(0),
                         weights=None if weights is None else weights.to(device).unsqueeze(0))


def project(module: nn.Module) -> None:
    """`MethodSpec.after_optimizer_step`: the deltas back into their balls right after the update."""
    if isinstance(module, CPTEmbedding):
        module.project_()


def reference_forward(
    base_model: PreTrainedModel,
    module: CPTEmbedding,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> CausalLMOutputWithPast:
    """The context in front of every row and PEFT's CPT loss, written out; the reference the engine is tested
    against (softprompt's inputs: the input's labels are the newest example's label tokens).

    Args:
        base_model: the frozen transformers causal LM.
        module: the CPT module (its forward projects the delta, as PEFT's does).
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.
        labels: ``[B, T]`` (-100 where no loss is wanted) or None.

    Returns:
        ``.logits [B, P + T, V]`` (virtual positions first, as in PEFT) and ``.loss`` (None without labels).
    """
    output = prompt_tuning_reference_forward(base_model, module(), input_ids, attention_mask)  # logits [B, P + T, V]
    if labels is None:
        return output
    config = module.config
    batch_size = input_ids.shape[0]
    context_types = torch.tensor(config.context_types, device=labels.device).expand(batch_size, -1)  # [B, P]
    # PEFT's input types: 4 (a label), shifted past the context's types so that the input is the newest example.
    newest = 4 * (int(context_types.max()) // 4 + 1)
    types = torch.cat([context_types, torch.full_like(labels, newest)], dim=1)  # [B, P + T]
    context_ids = torch.tensor(config.context_token_ids, device=labels.device).expand(batch_size, -1)
    all_labels = torch.cat([context_ids, labels], dim=1).masked_fill(~is_label(types), IGNORE_INDEX)  # [B, P + T]
    logits, targets, target_types = output.logits[:, :-1], all_labels[:, 1:], types[:, 1:]  # position s predicts s + 1
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(targets)  # [B, P + T - 1]
    labelled = targets != IGNORE_INDEX
    weights = labelled.float()
    if config.opt_weighted_loss_type == "decay":
        for row in range(batch_size):  # PEFT's loop: label types of the row, highest first, weigh 1, g, g^2, ...
            decay, weight = torch.ones_like(weights[row]), 1.0
            for label_type in torch.flip(target_types[row][is_label(target_types[row])].unique(), [0]):
                decay[target_types[row] == label_type] = weight
                weight *= config.opt_loss_decay_factor
            weights[row] *= decay
    output.loss = (losses[labelled] * weights[labelled]).mean()
    return output


METHOD = MethodSpec(
    name="cpt",
    cli_name="cpt",
    config_class=CPTConfig,
    enters_as="virtual_tokens",
    build=build,
    empty=empty,
    enter=enter,
    peft_type="CPT",
    peft_fields=("num_virtual_tokens", "cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask", "opt_weighted_loss_type",
                 "opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon",
                 "tokenizer_name_or_path"),
    default_num_virtual_tokens=None,
    peft_module=from_prompt_embeddings(from_table),
    paper=Paper("Blau et al.", 2024, "2410.17222",
                "Context-aware Prompt Tuning: Advancing In-Context Learning with Adversarial Methods"),
    trains="`delta [P, C]` on the frozen embeddings of a P-token context (`cpt_token_ids`), whose label tokens' rows "
           "never move; the frozen `[P, C]` copy counts in all params",
    reference_forward=reference_forward,
    exports=(CPTConfig,),
    after_optimizer_step=project,
)
