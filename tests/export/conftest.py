import pytest

from export_helpers import make_qm


@pytest.fixture
def qm_factory(tiny_dir):
    return lambda **spec: make_qm(tiny_dir, **spec)
