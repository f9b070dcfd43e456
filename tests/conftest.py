import os
from collections import Counter
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

from nas_split.numerics import torch_threads  # noqa: E402

os.environ.setdefault("NAS_SPLIT_DATA", "/nonexistent-nas-split-data")  # tests never read a user's data
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def two_threads(monkeypatch):
    """Two torch threads, also in the processes the test starts, whatever the worker has: for the tests whose
    stored numbers (the golden records) or margins were set with two, as float sums depend on the count."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with torch_threads(2):
        yield


#: Each test's seconds (setup + call + teardown) in a full ``make test`` on 2 cores, from ``tests/durations.txt``
#: (``make durations`` measures them again).  Tests of ``SLOW_SECONDS`` or more are marked ``slow`` so that
#: ``make test-fast`` (``-m "not slow"``) stays an edit loop; ``make test`` runs them all.
SECONDS = {nodeid: float(s) for s, nodeid in (line.split(maxsplit=1) for line in
           Path(__file__).with_name("durations.txt").read_text().splitlines() if line and not line.startswith("#"))}
SLOW_SECONDS = 2.5


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SECONDS.get(item.nodeid, 0.0) >= SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)
    # Whole modules, the longest first by their recorded seconds (a stable sort: each module's tests keep their
    # order).  ``make test`` runs ``--dist loadfile --no-loadscope-reorder``: each worker takes whole modules (a
    # module fixture is built once), the next in this order whenever it is free (greedy longest-processing-time),
    # so that no long module starts last and runs alone while the other worker idles.
    module = Counter()
    for item in items:
        module[item.path] += SECONDS.get(item.nodeid, 0.0)
    items.sort(key=lambda item: -module[item.path])
