"""Suite-wide collection order."""

from __future__ import annotations

import pytest

# Runs the whole CUDA simulator suite in a pytest process of its own (about 8 minutes on 2
# cores): first, so that under the README's `-n 2 --dist loadfile` one worker starts it while
# the other takes the other files, instead of running it alone at the end.
FIRST = "test_cuda_simulator_process.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name != FIRST)  # stable: the rest keep their order
