"""Test-wide switches: markers, skips, seeding, and poisoned kernel outputs.

Markers: `gpu` (needs CUDA; skipped without it; `pytest -m gpu` runs exactly these) and `triton` (runs Triton
kernels: needs CUDA, or TRITON_INTERPRET=1 set in the environment before pytest starts, which runs them on the
CPU; skipped with the reason otherwise). This file does not set TRITON_INTERPRET: the README's test command does.
"""
import pytest
import torch

from qwenvl_kernels import interpreting, launch

CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one); `-m gpu` selects these")
    config.addinivalue_line("markers", "triton: runs the Triton kernels: needs a CUDA GPU or TRITON_INTERPRET=1")
    config.addinivalue_line("markers", "slow: slow under the Triton interpreter")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_triton = pytest.mark.skip(reason="runs the Triton kernels: needs a CUDA GPU, or TRITON_INTERPRET=1 in the "
                                        "environment (the interpreter, on the CPU)")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(no_gpu)
        elif "triton" in item.keywords and not (CUDA or interpreting()):
            item.add_marker(no_triton)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Every buffer a kernel must overwrite starts as NaN, so an element a kernel skips cannot pass."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
