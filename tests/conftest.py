import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def oracles_dir():
    path = SHARED / "oracles"
    if not path.is_dir():
        pytest.skip(f"oracle tensors not found at {path} (they live in ../shared/oracles beside the repo)")
    return path


@pytest.fixture(scope="session")
def data_dir():
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (it lives in ../shared/data beside the repo)")
    return path


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Small ops on a shared 2-core CPU run 10-30x slower with two OpenMP threads fighting for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
