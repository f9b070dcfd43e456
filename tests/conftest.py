import os
from pathlib import Path

#: pytest-xdist workers (``make test`` runs one per core of 2): each gets one torch thread, and ``OMP_NUM_THREADS``
#: gives the same default to the processes a test starts (NNI ts trials; DDP ranks and compare workers set their
#: own count: CPUs per process, ``nas_split.compare.worker_threads``).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, os.cpu_count() or 1) // WORKERS)
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
# Idle OpenMP threads sleep instead of spinning (read when torch loads OpenMP, hence before the import): where a
# test runs more threads than cores (two_threads below, a compare run's own count) they share the cores instead of
# stalling each other at every barrier.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("NAS_SPLIT_DATA", "/nonexistent-nas-split-data")  # tests never read a user's data
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def two_threads(monkeypatch):
    """Two torch threads, also in the processes the test starts, whatever the worker has: for the tests whose
    stored numbers (the golden records) or margins were set with two, as float sums depend on the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    yield
    torch.set_num_threads(before)


#: Tests that took 2.5 s or more in a full run on 2 cores (``make test``'s ``--durations``), one node id per line:
#: marked ``slow`` so that ``make test-fast`` (``-m "not slow"``) stays an edit loop; ``make test`` runs them all.
#: Regenerate: ``pytest --durations=0 -q > d.log`` then keep the node ids whose setup + call + teardown >= 2.5 s.
SLOW = set(Path(__file__).with_name("slow_tests.txt").read_text().split())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)
