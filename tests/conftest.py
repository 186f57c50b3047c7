import pytest

from tests.helpers import make_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random tiny DeepSeek-V3 checkpoint (transformers layout, with an MTP layer added)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0, mtp=True)
