"""Fused linear + cross-entropy: the Triton kernels and the chunked torch path against the naive formula.

Without CUDA the kernels run under the Triton CPU interpreter, which needs TRITON_INTERPRET=1 set before the
kernels are decorated, hence the flag at the very top, before the kernel module is imported. (conftest.py has
usually imported triton already, through transformers; the kernels are written to work in that case too.)
The interpreter is slow per operation, so the kernel cases keep C <= 64 and V <= 5003.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from softprompt.kernels import fused_linear_cross_entropy as flce  # noqa: E402
from softprompt.kernels import linear_cross_entropy_triton as triton_kernels  # noqa: E402
from softprompt.kernels.fused_linear_cross_entropy import (  # noqa: E402
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
    torch_fused_linear_cross_entropy,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_kernels.TRITON_AVAILABLE, reason="triton is not installed")
IMPLEMENTATIONS = ["torch", pytest.param("triton", marks=needs_triton)]

# Tolerances. Both sides compute in fp32 from the same (already rounded) inputs, so they differ only by the
# summation order: ~1e-6 relative over C <= 64 products and V <= 5003 exponentials, hence rtol 1e-5 for fp32
# values and for the fp32 loss in every dtype. Half-precision gradients are rounded once to the output dtype
# on each side, so they may differ by one unit in the last place: 2**-10 (fp16) and 2**-7 (bf16) relative,
# hence rtol 2e-3 and 1.6e-2. atol is the same fraction of the gradient's largest entry: most entries of
# grad_weight are tiny (vocabulary rows with ~0 probability) and have no relative precision to check.
LOSS_RTOL = 1e-5
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype == dtype
    rtol = GRAD_RTOL[dtype]
    atol = rtol * expected.float().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def make_inputs(n_rows, channels, vocab, dtype, *, weight_requires_grad, ignored=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Logits with a spread of ~10 so that the running max moves between chunks (exercises the rescaling).
    hidden = torch.randn(n_rows, channels, generator=generator) * 2.0
    weight = torch.randn(vocab, channels, generator=generator) * (5.0 / channels**0.5)
    targets = torch.randint(0, vocab, (n_rows,), generator=generator)
    targets[list(ignored)] = -100
    targets[0] = vocab - 1 if 0 not in ignored else targets[0]  # the last column: the ragged tail of the last chunk
    hidden = hidden.to(DEVICE, dtype).requires_grad_()
    weight = weight.to(DEVICE, dtype).requires_grad_(weight_requires_grad)
    return hidden, weight, targets.to(DEVICE)


def check_against_reference(implementation, hidden, weight, targets, vocab_chunk_size, dtype):
    expected = reference_linear_cross_entropy(hidden, weight, targets)
    wrt = (hidden, weight) if weight.requires_grad else (hidden,)
    expected_grads = torch.autograd.grad(expected, wrt)

    loss = fused_linear_cross_entropy(
        hidden, weight, targets, implementation=implementation, vocab_chunk_size=vocab_chunk_size
    )
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=LOSS_RTOL, atol=LOSS_RTOL)
    grads = torch.autograd.grad(loss, wrt)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_grad_close(grad, expected_grad, dtype)


# (N, C, V, vocab_chunk_size, ignored rows): N = 1 and primes, 17 > the kernels' 16-row block, prime C, V not a
# multiple of any block, chunks smaller than V (ragged last chunk) and larger than V.
SHAPES = [
    pytest.param(1, 37, 1009, 4096, (), id="N1-C37-V1009-chunk>V"),
    pytest.param(7, 37, 1009, 100, (2, 5), id="N7-C37-V1009-chunk100-ignored"),
    pytest.param(17, 16, 1009, 256, (3, 4, 15), id="N17-C16-V1009-chunk256-ignored"),
    pytest.param(13, 64, 5003, 1024, (1,), id="N13-C64-V5003-chunk1024-ignored"),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("weight_requires_grad", [False, True], ids=["frozen-weight", "weight-grad"])
@pytest.mark.parametrize("n_rows, channels, vocab, vocab_chunk_size, ignored", SHAPES)
def test_matches_reference(
    implementation, dtype, weight_requires_grad, n_rows, channels, vocab, vocab_chunk_size, ignored
):
    hidden, weight, targets = make_inputs(
        n_rows, channels, vocab, dtype, weight_requires_grad=weight_requires_grad, ignored=ignored
    )
    if n_rows > 1 and vocab_chunk_size < vocab:
        # Just past the first chunk: a column that the first chunk's padded kernel tile also covers, and must
        # leave to the second chunk.
        targets[n_rows - 1] = vocab_chunk_size + 1
    check_against_reference(implementation, hidden, weight, targets, vocab_chunk_size, dtype)


# bf16 for both implementations on every device: the torch path computes in fp32 from the bf16 inputs. Under the CPU
# interpreter the kernels load bf16 and multiply in fp32 (`_native_dot` is off there, since the interpreter's bf16
# arithmetic is wrong), which checks the bf16 loads, stores and casts; the tensor-core bf16 dot runs on a GPU only.
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("n_rows, channels, vocab, vocab_chunk_size, ignored", SHAPES)
def test_matches_reference_bf16(implementation, n_rows, channels, vocab, vocab_chunk_size, ignored):
    # Tolerances: LOSS_RTOL and GRAD_RTOL[bf16] (see the top of the file). The loss is fp32 on both sides and differs
    # by summation order only; each bf16 gradient entry is one rounding of fp32 values that agree closely, so about
    # one bf16 ulp (2**-7 relative) apart at most, and 1.6e-2 allows two. Measured on CPU, both implementations:
    # loss within 1.2e-7 relative, gradients within 9e-5 of their largest entry; a lost chunk or row is off by
    # the gradient's own size.
    hidden, weight, targets = make_inputs(
        n_rows, channels, vocab, torch.bfloat16, weight_requires_grad=True, ignored=ignored
    )
    check_against_reference(implementation, hidden, weight, targets, vocab_chunk_size, torch.bfloat16)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_non_contiguous_hidden(implementation):
    """The kernels take strides: a column slice of a wider tensor must give the same result."""
    _, weight, targets = make_inputs(5, 37, 1009, torch.float32, weight_requires_grad=True)
    wide = torch.randn(5, 50, device=DEVICE) * 2.0
    hidden = wide[:, 3:40].requires_grad_()  # [5, 37] with row stride 50
    assert not hidden.is_contiguous()
    check_against_reference(implementation, hidden, weight, targets, 300, torch.float32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("n_rows", [0, 1, 6])
def test_all_targets_ignored_gives_zero_loss_and_zero_grads(implementation, n_rows):
    """F.cross_entropy returns NaN here; the fused loss returns 0 so that a label-free batch changes nothing."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(n_rows, 37, generator=generator).to(DEVICE).requires_grad_()
    weight = torch.randn(1009, 37, generator=generator).to(DEVICE).requires_grad_()
    targets = torch.full((n_rows,), -100, device=DEVICE)
    loss = fused_linear_cross_entropy(hidden, weight, targets, implementation=implementation, vocab_chunk_size=512)
    assert loss.item() == 0.0
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_custom_ignore_index(implementation):
    """A non-negative ignore_index is a real column: ignored rows must still add nothing."""
    hidden, weight, targets = make_inputs(6, 16, 300, torch.float32, weight_requires_grad=True)
    targets[[1, 4]] = 7
    loss = fused_linear_cross_entropy(hidden, weight, targets, implementation=implementation, ignore_index=7)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, ignore_index=7)
    torch.testing.assert_close(loss, expected, rtol=LOSS_RTOL, atol=LOSS_RTOL)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    for grad, expected_grad in zip(grads, expected_grads):
        assert_grad_close(grad, expected_grad, torch.float32)


class LogitsBlockRecorder(TorchFunctionMode):
    """Records the shape of every matrix product's output (the logits blocks of a chunked pass)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm):
            self.shapes.append(tuple(output.shape))
        return output


def test_torch_entry_point_is_the_chunked_path(monkeypatch):
    """torch_fused_linear_cross_entropy walks the vocabulary in chunks (1009 = 10 x 100 + 9: a ragged last chunk),
    forward and backward, never forming [N, V] logits, and gives the full-logits reference's loss and gradients."""
    n_rows, channels, vocab, chunk = 6, 16, 1009, 100
    hidden, weight, targets = make_inputs(n_rows, channels, vocab, torch.float32, weight_requires_grad=True,
                                          ignored=(2,))
    targets[1], targets[3] = chunk - 1, chunk  # the two sides of a chunk boundary (targets[0] is in the ragged tail)
    passes = {"forward": LogitsBlockRecorder(), "backward": LogitsBlockRecorder()}

    def recorded(function, recorder):
        def run(*args, **kwargs):
            with recorder:
                return function(*args, **kwargs)

        return run

    forward, backward = flce._IMPLEMENTATIONS["torch"]
    monkeypatch.setitem(
        flce._IMPLEMENTATIONS, "torch", (recorded(forward, passes["forward"]), recorded(backward, passes["backward"]))
    )
    loss = torch_fused_linear_cross_entropy(hidden, weight, targets, vocab_chunk_size=chunk)
    grads = torch.autograd.grad(loss, (hidden, weight))
    for name, recorder in passes.items():
        # [N, chunk] logits blocks; the backward's other products are [N, C] and [chunk, C].
        widths = sorted(shape[1] for shape in recorder.shapes if shape[0] == n_rows and shape[1] != channels)
        assert widths == [vocab % chunk] + [chunk] * (vocab // chunk), (name, recorder.shapes)

    # LOSS_RTOL and GRAD_RTOL[fp32] (see the top of the file): the online log-sum-exp over 11 chunks and the full
    # logits' log-sum-exp differ only in summation order, ~1e-6 relative.
    expected = reference_linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(loss, expected, rtol=LOSS_RTOL, atol=LOSS_RTOL)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, (hidden, weight))):
        assert expected_grad.abs().max() > 0
        assert_grad_close(grad, expected_grad, torch.float32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_strided_targets_are_read_as_their_values(implementation):
    """A column of a label matrix is a strided view; the kernels index targets by row, so they must see its values."""
    hidden, weight, _ = make_inputs(5, 16, 101, torch.float32, weight_requires_grad=True)
    label_matrix = torch.randint(0, 101, (5, 3), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    targets = label_matrix[:, 1]  # stride 3
    assert not targets.is_contiguous()
    check_against_reference(implementation, hidden, weight, targets, 32, torch.float32)


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "hidden_shape, weight_shape, targets, match",
    [
        ((4, 8), (50, 9), torch.zeros(4, dtype=torch.long), r"disagree on C \(8 vs 9\)"),
        ((4, 8), (8, 50), torch.zeros(4, dtype=torch.long), r"disagree on C \(8 vs 50\).*transpose"),
        ((2, 4, 8), (50, 8), torch.zeros(8, dtype=torch.long), r"expected \[N, C\]"),
        ((4, 8), (50, 8), torch.zeros(4, dtype=torch.int32), r"dtype torch.int32 .* expected int64"),
        ((4, 8), (50, 8), torch.zeros(2, 2, dtype=torch.long), r"shape \(2, 2\): expected int64 of shape \[N\] = \[4"),
        ((4, 8), (50, 8), torch.tensor([0, 50, 1, 2]), r"class id 50: expected ids in \[0, 50\)"),
        ((4, 8), (50, 8), torch.tensor([0, -3, 1, 2]), r"class id -3"),
    ],
)
def test_bad_input_raises_clear_error(implementation, hidden_shape, weight_shape, targets, match):
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(
            torch.randn(hidden_shape, device=DEVICE),
            torch.randn(weight_shape, device=DEVICE),
            targets.to(DEVICE),
            implementation=implementation,
        )


def test_unknown_implementation_raises():
    with pytest.raises(ValueError, match=r"implementation='cuda': expected 'triton' or 'torch'"):
        fused_linear_cross_entropy(
            torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), implementation="cuda"
        )


def test_bad_vocab_chunk_size_raises():
    with pytest.raises(ValueError, match=r"vocab_chunk_size=0: expected a positive int"):
        torch_fused_linear_cross_entropy(
            torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), vocab_chunk_size=0
        )


def test_module_imports_without_triton_and_triton_path_says_how_to_install(monkeypatch):
    """`import triton` failing must not break the module; asking for the kernels then names the fix."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    fresh = {}
    for name, source in (("softprompt.kernels.linear_cross_entropy_triton", triton_kernels), (flce.__name__, flce)):
        spec = importlib.util.spec_from_file_location(name, source.__file__)
        fresh[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, fresh[name])  # the entry point imports the fresh launchers
        spec.loader.exec_module(fresh[name])
    assert not fresh["softprompt.kernels.linear_cross_entropy_triton"].TRITON_AVAILABLE
    module = fresh[flce.__name__]
    hidden, weight, targets = torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 3])
    with pytest.raises(RuntimeError, match=r"pip install triton.*implementation='torch'"):
        module.fused_linear_cross_entropy(hidden, weight, targets, implementation="triton")
    # The torch path still works (LOSS_RTOL: fp32 summation order only, see the top of the file).
    torch.testing.assert_close(
        module.fused_linear_cross_entropy(hidden, weight, targets, implementation="torch"),
        reference_linear_cross_entropy(hidden, weight, targets),
        rtol=LOSS_RTOL,
        atol=LOSS_RTOL,
    )


@needs_triton
def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(triton_kernels, "kernels_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match=r"need CUDA tensors; got tensors on cpu.*'torch'.*TRITON_INTERPRET=1"):
        fused_linear_cross_entropy(
            torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 3]), implementation="triton"
        )


def test_float64_inputs_keep_float64_in_the_torch_path_and_the_reference():
    # A float64 model's loss must not be narrowed to float32: against the float64 formula the chunked torch path
    # agrees to ~1e-15 (summation order over C = 64 and V = 3001), far below float32's ~1e-7; the Triton kernels take
    # no float64 and say so.
    hidden, weight, targets = make_inputs(7, 64, 3001, torch.float64, weight_requires_grad=True, ignored=(2,))
    valid = targets != -100
    logits = hidden @ weight.T  # [N, V] float64
    exact = (torch.logsumexp(logits[valid], dim=1) - logits[valid].gather(1, targets[valid, None]).squeeze(1)).mean()
    exact_gradients = torch.autograd.grad(exact, [hidden, weight])
    for loss in (torch_fused_linear_cross_entropy(hidden, weight, targets, vocab_chunk_size=512),
                 reference_linear_cross_entropy(hidden, weight, targets)):
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, exact, rtol=1e-13, atol=0)
        for gradient, expected in zip(torch.autograd.grad(loss, [hidden, weight]), exact_gradients):
            assert gradient.dtype == torch.float64
            torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-15)
    if triton_kernels.TRITON_AVAILABLE:
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            fused_linear_cross_entropy(hidden, weight, targets, implementation="triton")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("weight_requires_grad", [False, True], ids=["frozen-weight", "weight-grad"])
@pytest.mark.parametrize("n_rows, channels, vocab, vocab_chunk_size, ignored", SHAPES)
def test_row_losses_match_the_reference(implementation, weight_requires_grad, n_rows, channels, vocab,
                                        vocab_chunk_size, ignored):
    # reduction="none": each row's loss (0 on ignored rows), and a backward that weighs each row by its own incoming
    # gradient, which is what weighted losses (CPT's decay, per-adapter means) need.
    hidden, weight, targets = make_inputs(n_rows, channels, vocab, torch.float32,
                                          weight_requires_grad=weight_requires_grad, ignored=ignored)
    row_weights = torch.linspace(0.5, 2.0, n_rows, device=DEVICE)
    expected = torch.nn.functional.cross_entropy(hidden.float() @ weight.float().T, targets, reduction="none")
    wrt = (hidden, weight) if weight.requires_grad else (hidden,)
    expected_grads = torch.autograd.grad((expected * row_weights).sum() / n_rows, wrt)
    losses = fused_linear_cross_entropy(hidden, weight, targets, implementation=implementation,
                                        vocab_chunk_size=vocab_chunk_size, reduction="none")
    assert losses.shape == (n_rows,)
    torch.testing.assert_close(losses, expected, rtol=LOSS_RTOL, atol=LOSS_RTOL)
    for grad, expected_grad in zip(torch.autograd.grad((losses * row_weights).sum() / n_rows, wrt), expected_grads):
        assert_grad_close(grad, expected_grad, torch.float32)
