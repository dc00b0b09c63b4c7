import os
import warnings

# Triton kernels run in Triton's interpreter on machines without a GPU; this must be set
# before triton is first imported (tests/test_triton.py). nvidia-smi's absence stands in for
# "no GPU" so torch need not be imported first.
import shutil  # noqa: E402

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sparsec  # noqa: E402
from sparsec.models.llama import tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_state():
    sparsec.counters.clear()
    torch._dynamo.reset()
    yield
    sparsec.plugins.reset_registry()


@pytest.fixture(scope="session")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 24), generator=g) for _ in range(4)]


@pytest.fixture(scope="session")
def tiny_plan(tiny, tiny_batches):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsec.calibrate(tiny, tiny_batches, "teal-40", progress=False)


def state_hash(model: torch.nn.Module) -> dict:
    """Exact fingerprint of every parameter and buffer (values, dtype, shape, identity)."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[name] = (t.dtype, tuple(t.shape), t.detach().double().sum().item(), t.detach().abs().double().sum().item(), t._version)
    return out
