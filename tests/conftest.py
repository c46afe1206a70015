"""Shared fixtures: a tiny CPU config (lightning-hydra-template style) and an isolated corpus cache."""
import os
import tempfile

import pytest

# one corpus cache per test session, never the user's home
os.environ.setdefault("BLACKMAMBA_CACHE", tempfile.mkdtemp(prefix="blackmamba-test-cache-"))
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton is imported.
# Kernel tests call the kernels directly; everything else dispatches to the PyTorch references on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_argv(out_dir, *extra):
    """Command-line overrides that shrink any run to a few seconds on a CPU."""
    return [
        "model=tiny",
        "trainer=debug",
        "data.seq_len=32",
        "data.batch_size=4",
        "data.val_batches=2",
        "trainer.max_steps=4",
        "trainer.val_every=2",
        "trainer.progress_bar=false",
        f"out_dir={out_dir}",
        *extra,
    ]


@pytest.fixture
def tiny(tmp_path):
    return lambda *extra: tiny_argv(tmp_path, *extra)
