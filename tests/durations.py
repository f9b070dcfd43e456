"""Write ``tests/durations.txt`` (each test's seconds: the ``slow`` marks and the workers' order in
``tests/conftest.py``) from a ``pytest --durations=0`` log on standard input: ``make durations``."""
import re
import sys
from collections import Counter
from pathlib import Path

HEADER = "# seconds node-id: setup + call + teardown in a full `make test` on 2 cores (`make durations` rewrites it)\n"


def parse(log: str) -> Counter:
    """Seconds per node id, summed over setup, call and teardown."""
    seconds: Counter = Counter()
    for s, nodeid in re.findall(r"^([\d.]+)s (?:setup|call|teardown) +(.+?)\s*$", log, re.M):
        seconds[nodeid] += float(s)
    return seconds


if __name__ == "__main__":
    seconds = parse(sys.stdin.read())
    if not seconds:
        sys.exit("durations: no --durations lines on standard input")
    out = Path(__file__).with_name("durations.txt")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(HEADER + "".join(f"{seconds[n]:.2f} {n}\n" for n in sorted(seconds)))
    tmp.replace(out)
