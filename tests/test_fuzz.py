"""Seeded fuzzing of every file a user hands nas-split: compare configs, cost profiles, run files
(``results.json``), checkpoints and grown-model files, stage states.

Each input is a valid file mutated at random (a key dropped or added, a value of another type, bytes truncated,
flipped or made non-UTF-8, YAML anchors), with a fixed seed so a failure reproduces.  The property, for every
input: the reader returns, or raises a :class:`~nas_split.errors.NasSplitError` whose message is one line; never
another exception (a traceback at the CLI), never a hang (each case runs under an alarm), and nothing is
written anywhere.  A last group runs fuzzed compare configs through the CLI in a subprocess: exit 0 or exit 2 with
one line on stderr, and nothing written outside ``--out``.
"""
import copy
import hashlib
import json
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import search_spaces
from nas_split.checkpoints import resume_point
from nas_split.cli import main
from nas_split.compare import CompareConfig, validate_compare
from nas_split.config import load_config
from nas_split.cost import ProfileModel
from nas_split.errors import NasSplitError
from nas_split.records import RunResult
from nas_split.retrain import retrain_config
from nas_split.surgery.export import read_grown

CASES = 60  # per kind of input
ALARM = 30  # seconds one case may take before it counts as a hang
CLEAN = (NasSplitError, search_spaces.UnknownSpaceError)  # what the CLI prints as one line with exit code 2

COMPARE = {"dataset": "digits", "backbone": "mlp", "backbone_options": {"width_mult": 0.25},
           "seed_options": {"width_mult": 0.125}, "methods": ["scratch", {"method": "fast", "label": "f",
                                                                          "options": {"analysis_batches": 2}}],
           "seeds": [0], "target_mmacs": [0.006], "rounds": 1, "seed_epochs": 1, "latency": False,
           "train": {"epochs": 1, "batch_size": 64, "progress": False}, "out": "cmp"}
PROFILE = {"name": "board", "unit": "uJ", "measured": True, "source": "meter",
           "coefficients": {"mac": 1e-6, "weight_byte": 2e-5, "per_op": {"depthwise": {"mac": 3e-6}}},
           "layers": [{"op": "Conv2d", "in_channels": 3, "out_channels": 8, "input_size": [3, 8, 8],
                       "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                       "groups": 1, "bias": False, "cost": 0.5}]}
ODD_VALUES = [None, "abc", "", -1, 0, 2.5, 10**30, float("nan"), float("inf"), [], {}, [1, 2], {"a": 1}, True,
              "no", "../../escaped", "x" * 300, "\u00ff\u2603"]


def _paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def mutate(doc: Any, rng: random.Random) -> Any:
    """``doc`` with one to three random structural changes."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice([p for p in _paths(doc) if p])
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        key, op = path[-1], rng.random()
        if op < 0.2 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.3 and isinstance(parent, dict):
            parent[rng.choice(["bogus", "colour", "__class__", "factory"])] = rng.choice(ODD_VALUES)
        elif op < 0.4 and isinstance(parent[key], int | float) and not isinstance(parent[key], bool):
            parent[key] = -parent[key] if rng.random() < 0.5 else parent[key] * 10**rng.randint(3, 12)
        else:
            parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        if not isinstance(doc, dict):
            return doc
    return doc


def garble(data: bytes, rng: random.Random) -> bytes:
    """``data`` truncated, with bytes flipped, made non-UTF-8 or (text) given YAML anchors and aliases."""
    op = rng.random()
    if op < 0.3:
        return data[:rng.randint(0, max(len(data) - 1, 0))]
    if op < 0.6:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if op < 0.8:
        i = rng.randint(0, len(data))
        return data[:i] + b"\xff\xfe\x80" + data[i:]
    return b"a: &a [1, 2]\nb: &b [*a, *a]\nc: [*b, *b]\n" + data


def texts(base: dict, rng: random.Random, suffix: str) -> Iterator[bytes]:
    """``CASES`` fuzzed files of ``base``: structural mutations written as YAML / JSON, and garbled bytes."""
    dump = (lambda d: json.dumps(d).encode()) if suffix == ".json" else (lambda d: yaml.safe_dump(d).encode())
    for i in range(CASES):
        yield dump(mutate(base, rng)) if i % 3 else garble(dump(base), rng)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _alarm(signum, frame):
    raise TimeoutError("hang")


def check(call: Callable[[], Any], what: str) -> str:
    """Run one case: ``ok`` or the one-line message; fails the test on any other exception or a hang."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(ALARM)
    try:
        call()
        return "ok"
    except CLEAN as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip(), (what, msg)
        return msg
    except TimeoutError:
        pytest.fail(f"{what}: no answer within {ALARM} s")
    except Exception as e:  # noqa: BLE001 - the property under test: nothing else escapes
        pytest.fail(f"{what}: {type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 1-round growth run (checkpoints) and a finished ``run`` directory (model.pt + results.json)."""
    root = tmp_path_factory.mktemp("fuzz")
    assert main(["grow", "--dataset", "digits", "--backbone", "mlp", "--width-mult", "0.125", "--epochs", "1",
                 "--seed-epochs", "1", "--rounds", "1", "--method", "fast", "--set", "growth.analysis_batches=2",
                 "--no-progress", "--no-latency", "--out", str(root / "grow")]) == 0
    assert main(["run", "--method", "scratch", "--dataset", "digits", "--backbone", "mlp", "--epochs", "1",
                 "--target-mmacs", "0.01", "--no-progress", "--no-latency", "--out", str(root / "run")]) == 0
    return root


def test_fuzzed_compare_configs_and_profiles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    answers = []
    for i, data in enumerate(texts(COMPARE, rng, ".yaml")):
        p = tmp_path / f"c{i}.yaml"
        p.write_bytes(data)
        before = snapshot(tmp_path)
        answers.append(check(lambda p=p: validate_compare(load_config(CompareConfig, p)), f"compare config {i}"))
        assert snapshot(tmp_path) == before, i
    for suffix in (".yaml", ".json"):
        for i, data in enumerate(texts(PROFILE, rng, suffix)):
            p = tmp_path / f"p{i}{suffix}"
            p.write_bytes(data)
            answers.append(check(lambda p=p: ProfileModel.load(p), f"profile {p.name}"))
    refused = [a for a in answers if a != "ok"]
    assert len(refused) > len(answers) / 2  # the fuzzer does produce bad input, mostly
    assert any("measured" in a for a in refused) and any("aliases" in a for a in refused)


def test_fuzzed_run_files_checkpoints_and_stage_states(run_dir, tmp_path):
    rng = random.Random(1)
    results = json.loads((run_dir / "run" / "results.json").read_text())
    answers = []
    for i in range(CASES):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "model.pt").write_bytes((run_dir / "run" / "model.pt").read_bytes())
        doc = mutate(results, rng) if i % 3 else None
        (d / "results.json").write_bytes(json.dumps(doc).encode() if doc is not None
                                         else garble(json.dumps(results).encode(), rng))
        answers.append(check(lambda d=d: RunResult.load(d / "results.json"), f"results.json {i}"))
        answers.append(check(lambda d=d: retrain_config(d, ["dataset=digits"]), f"retrain of results.json {i}"))
    ckpt = run_dir / "grow" / "checkpoints" / "stage1.pt"
    payload = torch.load(ckpt, weights_only=True)
    for i in range(CASES):
        d = tmp_path / f"g{i}" / "checkpoints"
        d.mkdir(parents=True)
        if i % 2:
            (d / "stage0.pt").write_bytes(garble(ckpt.read_bytes(), rng))
        else:
            bad = mutate({k: v for k, v in payload.items() if k != "optimizer"}, rng)
            torch.save(bad, d / "stage0.pt")
        answers.append(check(lambda d=d: resume_point(d.parent), f"checkpoint {i}"))
        answers.append(check(lambda d=d: read_grown(d / "stage0.pt"), f"grown-model file {i}"))
        state = d / "stage0.state.pt"
        torch.save(mutate({"run": {"dataset": "digits", "train": {"epochs": 1}}, "epochs_total": 2}, rng), state)
        answers.append(check(lambda d=d: retrain_config(d / "stage0.pt"), f"stage state {i}"))
    assert sum(a != "ok" for a in answers) > len(answers) / 2


@pytest.mark.slow
def test_fuzzed_compare_configs_at_the_cli(tmp_path):
    """Whole commands, in a subprocess: exit 0, or 2 with one line; nothing written outside ``--out``."""
    rng = random.Random(2)
    base = {**COMPARE, "methods": ["scratch"]}
    cases = []
    for i in range(12):
        path = tmp_path / f"c{i}.yaml"
        if i % 4:
            path.write_text(yaml.safe_dump({k: v for k, v in mutate(base, rng).items() if k != "out"}))
        else:
            path.write_bytes(garble(yaml.safe_dump({k: v for k, v in base.items() if k != "out"}).encode(), rng))
        cases.append(["compare", "--config", f"c{i}.yaml", "--out", f"outs/o{i}", "--no-progress"])
    cases.append(["compare", "--config", "c0.yaml", "--out", "outs/o-label", "--set",
                  'methods=[{method: scratch, label: "../../../escaped"}]'])
    before = snapshot(tmp_path)
    script = ("import json, sys, io, contextlib\nfrom nas_split.cli import main\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err):\n"
              "        code = main(argv)\n"
              "    print('@@', json.dumps([code, err.getvalue()]))\n")
    p = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    codes = []
    answers = [line[3:] for line in p.stdout.splitlines() if line.startswith("@@ ")]
    for argv, line in zip(cases, answers, strict=True):
        code, err = json.loads(line)
        codes.append(code)
        if code != 0:
            lines = [s for s in err.strip().splitlines() if s.startswith("nas-split: error:")]
            assert code == 2 and len(lines) == 1, (argv, err)
    assert codes[-1] == 2 and 2 in codes[:-1]
    after = snapshot(tmp_path)
    outside = {k for k in set(after) - set(before) if not k.startswith("outs/")}
    assert not outside and not (tmp_path.parent / "escaped").exists(), outside
