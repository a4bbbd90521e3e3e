"""Test-wide set-up: `gpu`-marked tests skip without a CUDA GPU; hypothesis never times kernel builds."""

import pytest
import torch

try:
    from hypothesis import settings
except ImportError:  # hypothesis is in the `test` extra; tests that need it import it themselves
    settings = None
else:
    # A first example may build a kernel (seconds): hypothesis's per-example deadline would call that flaky.
    settings.register_profile("attnc", deadline=None)
    settings.load_profile("attnc")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
