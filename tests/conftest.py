import os

# The suite tests the compiled ops: a missing extension is an error here, not a silent fallback.
os.environ.setdefault("PYMERGE_REQUIRE_EXTENSION", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread hand-offs cost more than the maths, and float sums depend on the thread count (a
    module that compares against worker processes running one thread each needs the same). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
