"""The README's five-minute tour: every ``nas-split`` command in it parses and its configuration validates as
written, and the grow → resume → retrain and NNI → retrain chain runs as written (marked slow).  The compare
commands are the demo's (``make demo``) and the shapes ``tests/test_compare.py`` runs."""
import re
import shlex
from pathlib import Path

import pytest

from nas_split import cli
from nas_split.compare import CompareConfig
from nas_split.config import GrowRunConfig, MethodRunConfig, NniRunConfig, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"train": RunConfig, "grow": GrowRunConfig, "run": MethodRunConfig, "compare": CompareConfig,
           "nni": NniRunConfig}
#: what the tour elides or leaves to the reader's own files: commands holding one are not checked
ELIDED = ("...", "my.yaml", "EXPERIMENT_ID", "model.pt")


def tour_commands() -> list[str]:
    """The ``nas-split`` commands of the README's tour, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## A five-minute tour"):]
    tour = tour[:tour.index("\n## ", 3)]
    out = []
    for block in re.findall(r"```bash\n(.*?)```", tour, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("nas-split "):
                out.append(line)
    return out


def checked() -> list[str]:
    """The tour's commands without an elision."""
    return [c for c in tour_commands() if not any(e in shlex.split(c) for e in ELIDED)]


def test_the_tour_has_its_commands():
    verbs = [c.split()[1] for c in checked()]
    assert {"grow", "compare", "nni", "retrain"} <= set(verbs) and len(verbs) >= 9
    assert len(tour_commands()) - len(checked()) <= 5  # the elided ones


@pytest.mark.parametrize("command", checked())
def test_every_tour_command_parses_and_its_configuration_validates(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths in the tour are relative to the repository
    a = cli.build_parser().parse_args(shlex.split(command)[1:])
    if a.verb in CONFIGS and not getattr(a, "resume", None):
        cfg = load_config(CONFIGS[a.verb], a.config, cli._overrides(a))
        assert cfg.out  # validated: every key and flag of the command exists and has a valid value


@pytest.mark.slow
def test_grow_resume_nni_and_retrain_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # NNI's manifest
    chain = [c for c in checked() if c.split()[1] in ("grow", "nni", "retrain") and "runs/cmp" not in c]
    assert len(chain) >= 5
    for command in chain:
        assert cli.main(shlex.split(command)[1:] + ["--no-progress"] * ("--resume" not in command)) == 0, command
    printed = capsys.readouterr().out
    assert "stage" in printed and Path("runs/grow/results.json").is_file()
