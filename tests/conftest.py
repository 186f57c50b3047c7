import os

# Tiny models are dominated by per-op overhead: extra OpenMP threads only contend on a 2-core CI box.
# Set before torch is imported so that CLI subprocesses started by tests inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import make_checkpoint  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random tiny DeepSeek-V3 checkpoint (transformers layout, with an MTP layer added)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0, mtp=True)
