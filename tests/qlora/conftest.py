import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Training steps of tiny models: one intra-op thread is faster on a shared machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
