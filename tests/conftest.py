import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NAS_SPLIT_DATA", "/nonexistent-nas-split-data")  # tests never read a user's data
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: Tests that took 2.5 s or more in a full run on 2 cores (``make test``'s ``--durations``), one node id per line:
#: marked ``slow`` so that ``make test-fast`` (``-m "not slow"``) stays an edit loop; ``make test`` runs them all.
#: Regenerate: ``pytest --durations=0 -q > d.log`` then keep the node ids whose setup + call + teardown >= 2.5 s.
SLOW = set(Path(__file__).with_name("slow_tests.txt").read_text().split())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)
