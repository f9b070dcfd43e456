"""``grow``, ``run``, ``compare``, ``nni`` and ``retrain`` on one digits config write the same records as the code
of commit 080d774 did (stored in ``tests/golden/digits_records.json`` by ``tests/golden/fingerprint.py``): the moves
into the ``nni/``, ``growth/`` and ``cost/`` packages changed where code lives, not what it computes."""
import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.slow
def test_the_five_commands_write_the_stored_records(tmp_path, monkeypatch, two_threads):
    monkeypatch.setenv("HOME", str(tmp_path))  # NNI writes its manifest under $HOME
    monkeypatch.syspath_prepend(str(GOLDEN))
    sys.modules.pop("fingerprint", None)
    from fingerprint import fingerprints

    stored = json.loads((GOLDEN / "digits_records.json").read_text())
    work = tmp_path / "work"
    work.mkdir()
    now = json.loads(json.dumps(fingerprints(work)))  # tuples and floats as JSON would store them
    for command in ("grow", "run", "compare", "nni", "retrain"):
        assert now[command] == stored[command], command
