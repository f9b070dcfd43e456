"""Typed records keep the results.json layout: a real run's file reads into RunResult and writes back equal."""
import json

from nas_split.cli import main
from nas_split.records import RESULTS_SCHEMA_VERSION, RunResult, StageRecord


def test_run_result_round_trips_a_real_results_json(tmp_path):
    out = tmp_path / "g"
    assert main(["grow", "--dataset", "digits", "--backbone", "test_mobilenetv1", "--epochs", "1", "--seed-epochs",
                 "1", "--rounds", "1", "--no-progress", "--no-latency", "--set", "growth.analysis_batches=1",
                 "--set", "growth.fast_passes=1", "--out", str(out)]) == 0
    raw = json.loads((out / "results.json").read_text())
    res = RunResult.load(out / "results.json")
    assert res.to_dict() == raw and res.schema_version == RESULTS_SCHEMA_VERSION == raw["schema_version"]
    seed, grown = res.stages
    assert (seed.kind, grown.kind) == ("seed", "round") and seed.new_neurons == 0
    assert grown.new_neurons == raw["stages"][1]["growth"]["new_neurons"] > 0
    assert grown.analysis_seconds == raw["stages"][1]["analysis_seconds"] > 0
    assert grown.macs == raw["stages"][1]["cost"]["macs"] and res.meta["method"] == "fast"
    metric = grown.nni_metric(stage=1)
    assert metric["default"] == grown.test_acc and metric["macs"] == grown.macs and metric["stage"] == 1
    assert StageRecord.from_dict(raw["stages"][1]).to_dict() == raw["stages"][1]
