"""The Triton kernels of the fused linear + cross-entropy loss, and their launchers.

`fused_linear_cross_entropy.py` explains the math (an online log-sum-exp over vocabulary chunks) and holds the
autograd function that calls these launchers; `linear_cross_entropy_torch.py` holds the same math in plain PyTorch,
which the tests compare these kernels against. The forward kernel splits the vocabulary over programs and writes
per-split partial (max, sum-exp, target logit) triples that the launcher merges; the backward kernel recomputes each
chunk's logits from the saved log-sum-exp and adds its share of both gradients with atomics.

triton is optional: without it this module imports, `TRITON_AVAILABLE` is False and the launchers say how to install
it. Shapes: N rows, C hidden, V vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # triton is an optional dependency: the torch implementation needs nothing more
    triton = None
    tl = None
    TRITON_AVAILABLE = False


# ---------------------------------------------------------------------------------------------------------------
# 1. Triton kernels
# ---------------------------------------------------------------------------------------------------------------

# The kernels call only builtins of triton.language, plus tl.reduce with the combine functions behind tl.max and
# tl.sum, rather than tl.max / tl.sum / tl.zeros themselves. Those are @triton.jit functions of their own, so when
# triton was imported before TRITON_INTERPRET=1 was set (importing transformers does that, through torch._dynamo)
# they are compiled-mode objects that the CPU interpreter cannot call. This way the kernels run under the
# interpreter whenever the flag is set before this module is imported; on GPUs the code is the same as tl.max /
# tl.sum. tl.reduce's interpreter recognizes these two combine functions and reduces with numpy.

if TRITON_AVAILABLE:

    @triton.jit
    def _dot(a, b, acc, NATIVE_DOT: tl.constexpr):
        """``acc + a @ b`` in fp32.

        NATIVE_DOT (bf16 inputs): both operands are rounded to bf16 and multiplied on the tensor cores, accumulating
        in fp32. bf16 has fp32's exponent range, so d logit (probabilities ~1e-6 over a 250880 vocabulary) loses
        precision but never underflows. Otherwise (fp32, fp16) the operands are upcast and multiplied in IEEE fp32:
        tf32 would cost ~1e-3 relative on fp32 logits, and fp16 would flush small probabilities to zero.
        """
        if NATIVE_DOT:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")

    @triton.jit
    def _logits_tile(
        hidden_ptr,
        weight_ptr,
        rows,
        row_mask,
        cols64,
        col_mask,
        C,
        stride_hn,
        stride_hc,
        stride_wv,
        stride_wc,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_C: tl.constexpr,
        NATIVE_DOT: tl.constexpr,
    ):
        """The ``[BLOCK_N, BLOCK_V]`` logits ``hidden[rows] @ weight[cols].T``, ``-inf`` on masked columns.

        Both kernels recompute their tile this way (the forward to reduce it, the backward to form d logit), so a
        tile's logits are the same numbers in both.
        """
        channel_offsets = tl.arange(0, BLOCK_C)
        acc = tl.full([BLOCK_N, BLOCK_V], 0.0, tl.float32)
        for c0 in range(0, C, BLOCK_C):
            channels_in_block = c0 + channel_offsets
            channel_mask = channels_in_block < C
            h = tl.load(
                hidden_ptr + rows[:, None] * stride_hn + channels_in_block[None, :] * stride_hc,
                mask=row_mask[:, None] & channel_mask[None, :],
                other=0.0,
            )  # [BLOCK_N, BLOCK_C]
            weight_tile_t = tl.load(
                weight_ptr + cols64[None, :] * stride_wv + channels_in_block[:, None] * stride_wc,
                mask=col_mask[None, :] & channel_mask[:, None],
                other=0.0,
            )  # [BLOCK_C, BLOCK_V]
            acc = _dot(h, weight_tile_t, acc, NATIVE_DOT)
        return tl.where(col_mask[None, :], acc, float("-inf"))

    @triton.jit
    def _flce_forward_kernel(
        hidden_ptr,
        weight_ptr,
        targets_ptr,
        partial_max_ptr,
        partial_sumexp_ptr,
        partial_target_logit_ptr,
        N,
        C,
        V,
        span,
        num_splits,
        stride_hn,
        stride_hc,
        stride_wv,
        stride_wc,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_C: tl.constexpr,
        NATIVE_DOT: tl.constexpr,
    ):
        """Program (row block, vocabulary split): online max / sum-exp / target logit over its ``span`` columns.

        Writes ``[N, num_splits]`` partials; the launcher merges the splits (the same online rescaling), so
        that V is spread over many programs even when N is a single row block.
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        # -1 never equals a column id, so padding rows (and ignored rows) pick no target logit.
        target_ids = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

        running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
        running_sumexp = tl.full([BLOCK_N], 0.0, tl.float32)
        target_logit = tl.full([BLOCK_N], 0.0, tl.float32)

        v_begin = pid_s * span
        v_end = tl.minimum(v_begin + span, V)
        # v_begin < V for every launched split, so the first block has a real column and running_max turns
        # finite at once: no (-inf) - (-inf) = nan below.
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < v_end
            # int64: V * C exceeds 2**31 for the large BLOOMs (250880 * 14336).
            cols64 = cols.to(tl.int64)
            logits = _logits_tile(
                hidden_ptr, weight_ptr, rows, row_mask, cols64, col_mask, C,
                stride_hn, stride_hc, stride_wv, stride_wc, BLOCK_N, BLOCK_V, BLOCK_C, NATIVE_DOT,
            )  # [BLOCK_N, BLOCK_V]
            new_max = tl.maximum(running_max, tl.reduce(logits, 1, tl.standard._elementwise_max))
            running_sumexp = running_sumexp * tl.exp(running_max - new_max) + tl.reduce(
                tl.exp(logits - new_max[:, None]), 1, tl.standard._sum_combine
            )
            running_max = new_max
            # The column mask matters: a masked column past v_end may be a real column of the next split.
            is_target = (cols[None, :] == target_ids[:, None]) & col_mask[None, :]
            target_logit += tl.reduce(tl.where(is_target, logits, 0.0), 1, tl.standard._sum_combine)

        out = rows * num_splits + pid_s
        tl.store(partial_max_ptr + out, running_max, mask=row_mask)
        tl.store(partial_sumexp_ptr + out, running_sumexp, mask=row_mask)
        tl.store(partial_target_logit_ptr + out, target_logit, mask=row_mask)

    @triton.jit
    def _flce_backward_kernel(
        hidden_ptr,
        weight_ptr,
        targets_ptr,
        lse_ptr,
        row_scale_ptr,
        grad_hidden_ptr,
        grad_weight_ptr,
        N,
        C,
        V,
        span,
        stride_hn,
        stride_hc,
        stride_wv,
        stride_wc,
        COMPUTE_GRAD_HIDDEN: tl.constexpr,
        COMPUTE_GRAD_WEIGHT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_C: tl.constexpr,
        NATIVE_DOT: tl.constexpr,
    ):
        """Program (vocabulary split): recompute its logits, form d logit, add its share of both gradients.

        ``grad_hidden`` (fp32 ``[N, C]``) sums over every split, hence atomics; ``grad_weight`` (fp32
        ``[V, C]``) rows belong to one split but sum over row blocks, and atomics keep that simple too.
        """
        pid_s = tl.program_id(0)
        offs_n = tl.arange(0, BLOCK_N)
        channel_offsets = tl.arange(0, BLOCK_C)
        v_begin = pid_s * span
        v_end = tl.minimum(v_begin + span, V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < v_end
            cols64 = cols.to(tl.int64)  # int64: V * C exceeds 2**31 for the large BLOOMs
            for n0 in range(0, N, BLOCK_N):
                rows = n0 + offs_n
                row_mask = rows < N
                logits = _logits_tile(
                    hidden_ptr, weight_ptr, rows, row_mask, cols64, col_mask, C,
                    stride_hn, stride_hc, stride_wv, stride_wc, BLOCK_N, BLOCK_V, BLOCK_C, NATIVE_DOT,
                )  # [BLOCK_N, BLOCK_V]
                # Padding rows load lse 0 and scale 0, so their (finite) probabilities are zeroed by the scale.
                lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
                scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
                target_ids = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
                prob = tl.exp(logits - lse[:, None])  # 0 on padding columns
                # Masked: a column past v_end may be the next split's, which subtracts that one-hot itself.
                onehot = tl.where((cols[None, :] == target_ids[:, None]) & col_mask[None, :], 1.0, 0.0)
                dlogits = (prob - onehot) * scale[:, None]  # [BLOCK_N, BLOCK_V]

                for c0 in range(0, C, BLOCK_C):
                    channels_in_block = c0 + channel_offsets
                    channel_mask = channels_in_block < C
                    if COMPUTE_GRAD_HIDDEN:
                        w = tl.load(
                            weight_ptr + cols64[:, None] * stride_wv + channels_in_block[None, :] * stride_wc,
                            mask=col_mask[:, None] & channel_mask[None, :],
                            other=0.0,
                        )  # [BLOCK_V, BLOCK_C]
                        zeros = tl.full([BLOCK_N, BLOCK_C], 0.0, tl.float32)
                        grad_h = _dot(dlogits, w, zeros, NATIVE_DOT)  # [BLOCK_N, BLOCK_C]
                        tl.atomic_add(
                            grad_hidden_ptr + rows[:, None] * C + channels_in_block[None, :],
                            grad_h,
                            mask=row_mask[:, None] & channel_mask[None, :],
                        )
                    if COMPUTE_GRAD_WEIGHT:
                        h = tl.load(
                            hidden_ptr + rows[:, None] * stride_hn + channels_in_block[None, :] * stride_hc,
                            mask=row_mask[:, None] & channel_mask[None, :],
                            other=0.0,
                        )  # [BLOCK_N, BLOCK_C]
                        grad_w = _dot(
                            tl.trans(dlogits), h, tl.full([BLOCK_V, BLOCK_C], 0.0, tl.float32), NATIVE_DOT
                        )  # [BLOCK_V, BLOCK_C]
                        tl.atomic_add(
                            grad_weight_ptr + cols64[:, None] * C + channels_in_block[None, :],
                            grad_w,
                            mask=col_mask[:, None] & channel_mask[None, :],
                        )


# ---------------------------------------------------------------------------------------------------------------
# 2. Launchers
# ---------------------------------------------------------------------------------------------------------------

_SUPPORTED_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _require_triton() -> None:
    """Raise the install hint when the Triton implementation is asked for without triton."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            "implementation='triton' needs the triton package, which is not installed. "
            "Fix: `pip install triton` (or `pip install softprompt[triton]`), or pass implementation='torch' "
            "(the same chunked math in plain PyTorch)."
        )


def kernels_interpreted() -> bool:
    """Whether the kernels were built for the Triton CPU interpreter (TRITON_INTERPRET=1 at import time).

    ``triton.jit`` reads the flag when the kernel is decorated, so the kernel object, not the current
    environment, says where it can run.
    """
    return not isinstance(_flce_forward_kernel, triton.runtime.jit.JITFunction)


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on tensors of `device` in this process, or None when they can.

    Args:
        device: where the loss's tensors live.

    Returns:
        A sentence naming what is missing (the triton package, or CUDA / the CPU interpreter), or None.
    """
    if not TRITON_AVAILABLE:
        return "the triton package is not installed"
    if torch.device(device).type != "cuda" and not kernels_interpreted():
        return (
            f"the Triton kernels need CUDA tensors and the tensors are on {torch.device(device)} (the CPU "
            "interpreter is off: TRITON_INTERPRET=1 was not set before softprompt was imported)"
        )
    return None


def check_kernel_inputs(hidden: Tensor, weight: Tensor) -> None:
    """Device and dtype checks that only the Triton kernels need."""
    _require_triton()
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if tensor.dtype not in _SUPPORTED_KERNEL_DTYPES:
            raise TypeError(
                f"{name} has dtype {tensor.dtype}: the Triton kernels take float32, float16 or bfloat16. "
                "Fix: cast it, or pass implementation='torch'."
            )
    if hidden.device.type != "cuda" and not kernels_interpreted():
        raise RuntimeError(
            f"The Triton kernels need CUDA tensors; got tensors on {hidden.device}. Fix: move them to a GPU, "
            "pass implementation='torch', or (slow, for tests) set TRITON_INTERPRET=1 before importing softprompt."
        )


def _block_sizes(n_rows: int, channels: int, vocab_chunk_size: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_C) tiles: 16 is tl.dot's smallest side on GPUs."""
    if kernels_interpreted():
        # The interpreter pays per operation, not per element: large vocabulary tiles keep the tests fast.
        block_v = min(1024, max(16, triton.next_power_of_2(vocab_chunk_size)))
        return 16, block_v, min(64, max(16, triton.next_power_of_2(channels)))
    # Up to 64 rows per tile: the weight tile loaded for a block of vocabulary serves them all (the seed recipe's
    # batch of 8 has 24 labelled rows: 3 per row).
    block_n = min(64, max(16, triton.next_power_of_2(n_rows)))
    block_v = min(128, max(16, triton.next_power_of_2(vocab_chunk_size)))
    return block_n, block_v, min(64, max(16, triton.next_power_of_2(channels)))


def _columns_per_program(
    vocab: int, vocab_chunk_size: int, block_v: int, num_row_blocks: int, device: torch.device
) -> int:
    """Vocabulary columns per program: at most ``vocab_chunk_size``, fewer when that would leave the GPU idle.

    With few labelled rows the vocabulary is the only parallel axis: 250880 / 4096 = 62 programs would leave half
    of an H100's 132 multiprocessors idle, so the split is made fine enough for about 4 programs per
    multiprocessor (a multiple of the tile width, so that only the last program has a partial tile).
    """
    if device.type != "cuda":
        return vocab_chunk_size
    wanted_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    wanted_splits = max(1, wanted_programs // num_row_blocks)
    span = triton.cdiv(triton.cdiv(vocab, wanted_splits), block_v) * block_v
    return min(vocab_chunk_size, max(block_v, span))


def _native_dot(hidden: Tensor, weight: Tensor) -> bool:
    """bf16 operands on a GPU: multiply them on the tensor cores (the interpreter computes bf16 wrongly)."""
    return hidden.dtype == weight.dtype == torch.bfloat16 and not kernels_interpreted()


def triton_fused_linear_cross_entropy_forward(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, vocab_chunk_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy terms of ``hidden @ weight.T`` with the Triton forward kernel.

    Args:
        hidden: ``[N, C]`` float32 / float16 / bfloat16.
        weight: ``[V, C]`` float32 / float16 / bfloat16.
        targets: ``[N]`` int64; ids outside ``[0, V)`` (the ignore index) pick no target logit.
        vocab_chunk_size: at most this many vocabulary columns per program (see `_columns_per_program`).

    Returns:
        ``(lse, target_logit)``, fp32 ``[N]`` each; the row loss is ``lse - target_logit``.

    Raises:
        RuntimeError: triton is not installed, or the tensors are on CPU without the interpreter.
        TypeError: an unsupported dtype.
    """
    check_kernel_inputs(hidden, weight)
    targets = targets.contiguous()  # the kernels read targets_ptr + row: a strided view would give other ids
    n_rows, channels = hidden.shape
    vocab = weight.shape[0]
    if n_rows == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone()
    block_n, block_v, block_c = _block_sizes(n_rows, channels, vocab_chunk_size)
    span = _columns_per_program(vocab, vocab_chunk_size, block_v, triton.cdiv(n_rows, block_n), hidden.device)
    num_splits = triton.cdiv(vocab, span)
    partial_max = torch.empty(n_rows, num_splits, dtype=torch.float32, device=hidden.device)
    partial_sumexp = torch.empty_like(partial_max)
    partial_target_logit = torch.empty_like(partial_max)
    grid = (triton.cdiv(n_rows, block_n), num_splits)
    _flce_forward_kernel[grid](
        hidden,
        weight,
        targets,
        partial_max,
        partial_sumexp,
        partial_target_logit,
        n_rows,
        channels,
        vocab,
        span,
        num_splits,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_C=block_c,
        NATIVE_DOT=_native_dot(hidden, weight),
    )
    # Merge the splits' (max, sum-exp) pairs with the same rescaling as inside the kernel.
    row_max = partial_max.amax(dim=1)  # [N]
    lse = row_max + torch.log((partial_sumexp * torch.exp(partial_max - row_max[:, None])).sum(dim=1))  # [N]
    target_logit = partial_target_logit.sum(dim=1)  # [N]: only the split holding the target adds a non-zero
    return lse, target_logit


def triton_fused_linear_cross_entropy_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    row_scale: Tensor,
    *,
    compute_grad_hidden: bool,
    compute_grad_weight: bool,
    vocab_chunk_size: int = 4096,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``sum_n row_scale[n] * (lse[n] - logit[n, targets[n]])`` with the Triton backward kernel.

    Args:
        hidden: ``[N, C]``, as given to the forward.
        weight: ``[V, C]``, as given to the forward.
        targets: ``[N]`` int64, as given to the forward.
        lse: ``[N]`` fp32 log-sum-exp from the forward.
        row_scale: ``[N]`` fp32 d loss / d row loss (``grad_output / num_valid``, 0 on ignored rows).
        compute_grad_hidden: whether to produce ``grad_hidden``.
        compute_grad_weight: whether to produce ``grad_weight``.
        vocab_chunk_size: at most this many vocabulary columns per program.

    Returns:
        ``(grad_hidden [N, C] in hidden's dtype or None, grad_weight [V, C] in weight's dtype or None)``.

    Raises:
        RuntimeError: triton is not installed, or the tensors are on CPU without the interpreter.
    """
    check_kernel_inputs(hidden, weight)
    targets = targets.contiguous()  # the kernels read targets_ptr + row: a strided view would give other ids
    n_rows, channels = hidden.shape
    vocab = weight.shape[0]
    # fp32 accumulators: both gradients are sums over many programs' atomic adds.
    grad_hidden = (
        torch.zeros(n_rows, channels, dtype=torch.float32, device=hidden.device) if compute_grad_hidden else None
    )
    grad_weight = (
        torch.zeros(vocab, channels, dtype=torch.float32, device=weight.device) if compute_grad_weight else None
    )
    if n_rows > 0 and (compute_grad_hidden or compute_grad_weight):
        block_n, block_v, block_c = _block_sizes(n_rows, channels, vocab_chunk_size)
        span = _columns_per_program(vocab, vocab_chunk_size, block_v, 1, hidden.device)
        grid = (triton.cdiv(vocab, span),)
        # An unused gradient still needs a pointer argument; the constexpr flag keeps it untouched.
        placeholder = lse
        _flce_backward_kernel[grid](
            hidden,
            weight,
            targets,
            lse,
            row_scale,
            grad_hidden if compute_grad_hidden else placeholder,
            grad_weight if compute_grad_weight else placeholder,
            n_rows,
            channels,
            vocab,
            span,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            COMPUTE_GRAD_HIDDEN=compute_grad_hidden,
            COMPUTE_GRAD_WEIGHT=compute_grad_weight,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            BLOCK_C=block_c,
            NATIVE_DOT=_native_dot(hidden, weight),
        )
    return (
        grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
        grad_weight.to(weight.dtype) if grad_weight is not None else None,
    )
