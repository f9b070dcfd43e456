"""Issue 24's benchmark parts: S3D's per-neuron ranking, the selection arms, the equal-MAC scratch curve, the
known-bad and random-architecture controls, and the shared protocol (``finetune_epochs``, ``schedule_span``)."""
import copy
import json
import math

import pytest
import torch

import search_spaces
from baselines.scratch import bottleneck_widths, log_distance, random_widths
from nas_split import Grower
from nas_split._io import MAX_CONFIG_BYTES
from nas_split.cli import main
from nas_split.cost import count_macs
from nas_split.report import interp_log_macs
from nas_split.splitting.schemes import best_s3d_split, s2d_split
from nas_split.surgery import apply_sizes
from nas_split.surgery.rebuild import resized_sizes, width_groups
from nas_split.training import TrainConfig, lr_factor

# --- S3D: gain per added neuron -----------------------------------------------------------------------------------

def test_s3d_per_neuron_rank_prefers_two_copies_when_their_gain_per_neuron_is_better():
    v, u = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # c = 3: P = 2, N = 1.  Gains: s2d -1 (1 new), s3d-min -2 (2 new), s3d-max -0.1 (2 new), s3d-both -2.1 (3 new)
    per = best_s3d_split("l", 0, -1.0, v, 0.1, u, c=3.0, max_copies=4, rank="neuron")
    tot = best_s3d_split("l", 0, -1.0, v, 0.1, u, c=3.0, max_copies=4, rank="total")
    assert (per.kind, per.scheme.copies, per.score) == ("s2d", 2, pytest.approx(-1.0))
    assert (tot.kind, tot.scheme.copies, tot.score) == ("s3d-both", 4, pytest.approx(-2.1))
    assert tot.score / tot.new_neurons == pytest.approx(-0.7)  # worse per neuron than s2d's -1


def test_s3d_per_neuron_rank_hand_values():
    v, u = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # lambda_min = -1, lambda_max = +4, c = 3: gains s2d -1, s3d-min -2, s3d-max -N*4 = -4, s3d-both -6
    pick = best_s3d_split("l", 0, -1.0, v, 4.0, u, c=3.0, max_copies=4, rank="neuron")
    # per neuron: s2d -1, s3d-min -1, s3d-max -2, s3d-both -2 -> tie between max and both, fewer copies wins
    assert (pick.kind, pick.score) == ("s3d-max", pytest.approx(-2.0))
    assert best_s3d_split("l", 0, -1.0, v, 4.0, u, c=3.0, max_copies=4, rank="total").kind == "s3d-both"


# --- the selection arms ---------------------------------------------------------------------------------------------

def _mbv1():
    torch.manual_seed(0)
    model = search_spaces.create("test_mobilenetv1", num_classes=4, in_chans=3, input_size=16)
    return model, torch.randn(8, 3, 16, 16)


def _hand_splits(g: Grower) -> list:
    """One S2D candidate per neuron with distinct hand-set gains (some positive) and a unit direction."""
    gen = torch.Generator().manual_seed(3)
    out, k = [], 0
    for layer, neuron in g.neurons().items():
        w = neuron.layer.weight
        for o in range(w.shape[0]):
            v = torch.randn(w.shape[1:], generator=gen)
            out.append(s2d_split(layer, o, -1.0 + 0.037 * k, v / v.norm()))
            k += 1
    return out


def _select(selection: str, seed: int = 0):
    model, x = _mbv1()
    base = count_macs(model, x)[0]
    g = Grower(model, x, "fast", grow_ratio=None, max_macs=1.25 * base, only_negative=False, selection=selection,
               seed=seed)
    splits = _hand_splits(g)
    return g, splits, g.select(splits)


def test_reverse_arm_takes_the_worst_first_under_the_same_cap():
    _, splits, top = _select("top")
    _, _, rev = _select("reverse")
    order = sorted(splits, key=lambda s: s.gain)
    assert [(s.layer, s.channel) for s in top] == [(s.layer, s.channel) for s in order[:len(top)]]
    assert [(s.layer, s.channel) for s in rev] == [(s.layer, s.channel) for s in order[::-1][:len(rev)]]
    assert rev[0].gain > 0 > top[0].gain  # hand gains run from -1 up past 0


def test_layer_random_arm_keeps_top_counts_per_layer_and_draws_the_neurons():
    _, splits, top = _select("top")
    _, own, c = _select("layer-random")
    count = lambda picked: {la: sum(s.layer == la for s in picked) for la in {s.layer for s in splits}}  # noqa: E731
    assert count(c) == count(top)
    assert len({(s.layer, s.channel) for s in c}) == len(c)  # without replacement
    assert {(s.layer, s.channel) for s in c} != {(s.layer, s.channel) for s in top}
    by = {(s.layer, s.channel): s for s in own}
    assert all(s is by[(s.layer, s.channel)] for s in c)  # each neuron keeps its own split


def test_random_direction_arm_keeps_top_neurons_and_weights_with_random_unit_directions():
    _, _, top = _select("top")
    _, _, d = _select("random-direction")
    assert [(s.layer, s.channel, s.scheme.weights) for s in d] == [(s.layer, s.channel, s.scheme.weights)
                                                                  for s in top]
    for a, b in zip(top, d, strict=True):
        r = b.scheme.directions.flatten(1)
        assert torch.allclose(r.norm(dim=1), torch.ones(2), atol=1e-6)
        assert torch.allclose(r[0], -r[1], atol=1e-6)  # the pair stays +r, -r
        cos = float(r[0] @ a.scheme.directions.flatten(1)[0])
        assert abs(cos) < 0.99  # not v_min


def test_random_direction_keeps_the_orthogonal_pairs_of_a_four_copy_split():
    from nas_split.splitting.selection import random_directions

    v, u = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    s = best_s3d_split("l", 0, -1.0, v, 4.0, u, c=3.0, rank="total")
    (r,) = random_directions([s], torch.Generator().manual_seed(0))
    d = r.scheme.directions
    assert torch.allclose(d.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(d[0], -d[1], atol=1e-6) and torch.allclose(d[2], -d[3], atol=1e-6)
    assert abs(float(d[0] @ d[2])) < 1e-6  # v ⟂ u stays r1 ⟂ r2


def test_arms_are_refused_with_the_lp():
    model, x = _mbv1()
    with pytest.raises(ValueError, match="not of the energy-aware LP"):
        Grower(model, x, "energy", selection="reverse")


# --- equal-MAC scoring, controls --------------------------------------------------------------------------------------

def test_interp_log_macs_hand_values():
    pts = [(1.0, 0.5), (4.0, 0.7), (16.0, 0.8)]
    assert interp_log_macs(pts, 2.0) == pytest.approx(0.6)  # log2: halfway between 1 and 4
    assert interp_log_macs(pts, 8.0) == pytest.approx(0.75)
    assert interp_log_macs(pts, 4.0) == pytest.approx(0.7)
    assert interp_log_macs(pts, 0.5) is None and interp_log_macs(pts, 17.0) is None
    assert interp_log_macs([(1.0, 0.4), (1.0, 0.6), (4.0, 0.7)], 2.0) == pytest.approx(0.6)  # equal MACs averaged
    assert interp_log_macs([(1.0, 0.4)], 1.0) is None


def test_bottleneck_widths_squeeze_one_width_at_the_target():
    model, x = _mbv1()
    base = width_groups(model, x)
    target = 3 * count_macs(model, x)[0]
    w = bottleneck_widths(model, x, target, fraction=0.25, position=0.5)
    names = list(base)
    squeezed = names[round(0.5 * (len(names) - 1))]
    scale = [w[n] / base[n] for n in names if n != squeezed]
    assert max(scale) / min(scale) < 1.35  # the rest scaled alike, up to rounding of small widths
    assert w[squeezed] / base[squeezed] == pytest.approx(0.25 * sum(scale) / len(scale), rel=0.35)
    grown = copy.deepcopy(model)
    apply_sizes(grown, resized_sizes(model, x, w))
    assert abs(count_macs(grown, x)[0] / target - 1) < 0.03
    # log distance: one of L log-ratios is ln(1/4) below the others: sqrt((L-1)/L^2) * ln 4
    n = len(names)
    assert log_distance(w, base) == pytest.approx(math.sqrt(n - 1) / n * math.log(4), rel=0.3)
    assert log_distance(base, base) == 0.0


def test_random_arch_draws_differ_and_draw_zero_is_the_old_architecture():
    from baselines.registration import RandomArchMethod

    model, x = _mbv1()
    target = 3 * count_macs(model, x)[0]

    class Ctx:
        target_mmacs, example_inputs = target / 1e6, x
        recipe = TrainConfig(seed=5)

    a, b = RandomArchMethod(draw=0), RandomArchMethod(draw=1)
    assert a.widths(Ctx, model) == random_widths(model, x, target, 2.0, 5)
    assert a.widths(Ctx, model) != b.widths(Ctx, model)


# --- the shared protocol ----------------------------------------------------------------------------------------------

COMPARE = ["compare", "--dataset", "digits", "--backbone", "mobilenetv1_cifar_025", "--set",
           "backbone_options.width_mult=0.25", "--seed-width-mult", "0.125", "--target-mmacs", "3", "--epochs", "1",
           "--seed-epochs", "1", "--rounds", "1", "--no-latency", "--seeds", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("span", ["stage", "run"])
def test_finetune_and_schedule_span_give_every_method_the_same_epochs_and_the_stated_lr_curve(tmp_path, span):
    out = tmp_path / "c"
    assert main([*COMPARE, "--out", str(out), "--set", "finetune_epochs=1", "--set", f"schedule_span={span}",
                 "--set", "methods=[{method: fast, options: {only_negative: false}}, prune-l1, scratch]"]) == 0
    cfg = TrainConfig()
    total = 1 + 1 * 1 + 1  # seed_epochs + rounds x epochs + finetune_epochs
    for label, kinds in (("fast", ["seed", "round", "finetune"]), ("prune-l1", ["full", "pruned", "finetune"]),
                         ("scratch", ["scratch"])):
        res = json.loads((out / "runs" / label / "3mmacs" / "seed0" / "results.json").read_text())
        assert [s["kind"] for s in res["stages"]] == kinds
        assert res["stages"][-1]["epochs_total"] == total
        lrs, done = [], 0
        for st in res["stages"]:
            if not st["epochs"]:
                continue
            per_epoch = st["train_samples"] // (st["epochs"] * cfg.batch_size)  # drop_last batches
            for e, h in enumerate(st["history"]):
                # the lr recorded for an epoch is its last step's
                if span == "run":  # one cosine over the whole run
                    step = (done + e + 1) * per_epoch - 1
                    want = cfg.lr * lr_factor(cfg, step / (total * per_epoch), total)
                else:  # a cosine per stage
                    step = (e + 1) * per_epoch - 1
                    want = cfg.lr * lr_factor(cfg, step / (st["epochs"] * per_epoch), st["epochs"])
                lrs.append(h["lr"])
                assert h["lr"] == pytest.approx(want, rel=1e-9, abs=1e-12)
            done += st["epochs"]
        assert len(lrs) == total
        if span == "run":
            assert lrs == sorted(lrs, reverse=True)  # no restart at a stage boundary


def test_warmup_fraction_is_of_the_schedule_not_of_train_epochs():
    c = TrainConfig(epochs=10, schedule="constant", warmup_epochs=1)
    # 1 warm-up epoch of a 2-epoch schedule is its first half; of train.epochs = 10, its first tenth
    assert lr_factor(c, 0.05, 2) == pytest.approx((0.05 + 1e-3) / 0.5)
    assert lr_factor(c, 0.05) == pytest.approx((0.05 + 1e-3) / 0.1)
    assert lr_factor(c, 0.6, 2) == 1.0


@pytest.mark.slow
def test_scratch_curve_scores_each_run_at_its_own_macs(tmp_path):
    import numpy as np

    out = tmp_path / "c"
    assert main([*COMPARE, "--out", str(out), "--seeds", "0,1", "--set", "scratch_curve=[0.7, 1.4]",
                 "--set", "methods=[scratch, bottleneck, {method: scratch, label: scratch-compute, "
                 "options: {epoch_fraction: 0.5}}]"]) == 0
    res, runs = {}, {}
    for p in [*out.glob("runs/*/*/seed*/results.json"), *out.glob("curve/*/*/seed*/results.json")]:
        r = json.loads(p.read_text())
        runs[(p.parts[-4], int(p.parts[-2][4:]))] = r
        if p.parts[-4] != "scratch-compute":
            res[(p.parts[-4], p.parts[-3], int(p.parts[-2][4:]))] = (r["final"]["mmacs"],
                                                                     100 * r["final"]["test_acc"])
    assert sorted(k[0] for k in res) == ["bottleneck"] * 2 + ["scratch"] * 2 + ["scratch-curve"] * 4
    for seed in (0, 1):  # scratch at half the training budget: 1 of the 2 epochs, half the training MACs
        half, full = runs[("scratch-compute", seed)]["stages"][0], runs[("scratch", seed)]["stages"][0]
        assert (half["epochs"], full["epochs"], half["epoch_fraction"]) == (1, 2, 0.5)
        assert half["widths"] == full["widths"] and half["train_macs"] == pytest.approx(full["train_macs"] / 2)
    d = []
    for seed in (0, 1):  # numpy's linear interpolation in log MACs over the seed's curve (curve runs + scratch)
        pts = sorted(v for (lab, _, s), v in res.items() if s == seed and lab in ("scratch", "scratch-curve"))
        assert len(pts) == 3
        macs, acc = res[("bottleneck", "3mmacs", seed)]
        d.append(acc - float(np.interp(np.log(macs), np.log([p[0] for p in pts]), [p[1] for p in pts])))
    row = next(ln for ln in (out / "table.md").read_text().splitlines() if ln.startswith("| bottleneck |"))
    assert f"{sum(d) / 2:+.2f} [" in row.split("|")[6]  # the Δ-vs-curve column
    assert "| MMACs | top-1 % | seeds |" in (out / "table.md").read_text()  # the curve's own table


def test_the_pareto_figure_draws_the_scratch_curve_through_the_scratch_runs_at_the_targets():
    import matplotlib.pyplot as plt

    from nas_split.report import Row
    from nas_split.report_files import pareto_figure

    def row(label, seed, mmacs, acc, target=4.0, **kw):
        return Row(label, seed, target, acc, mmacs, 0.0, 1.0, 0.0, 2, {}, **kw)

    # a curve run's target is its own MAC point (compare.plan_runs); seed 1 is 0.1 above seed 0 everywhere
    curve = [row("scratch-curve", s, m, a + s / 10, target=m) for s in (0, 1) for m, a in ((2.0, 0.5), (8.0, 0.8))]
    finals = [row("scratch", s, 4.0, 0.7 + s / 10, on_curve=True) for s in (0, 1)] + [row("fast", 0, 4.1, 0.75)]
    fig = pareto_figure(finals, curve)
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "scratch curve"]
    plt.close(fig)
    assert list(line.get_xdata()) == [2.0, 4.0, 8.0]
    assert list(line.get_ydata()) == pytest.approx([55, 75, 85])  # the seeds' mean at each point, in %


@pytest.mark.parametrize("label", ["../../../escaped", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_a_label_that_is_not_a_safe_directory_name_is_refused_before_anything_is_written(tmp_path, capsys, label):
    out = tmp_path / "cmp" / "inner"
    code = main([*COMPARE, "--out", str(out), "--set", f"methods=[{{method: scratch, label: '{label}'}}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "label" in err[0]
    assert not any(tmp_path.rglob("*"))  # nothing written, neither under --out nor beside it


# --- configuration files that must not hang or crash (issue 28, item 3) -------------------------------------------

def test_yaml_aliases_size_and_directories_are_refused_in_one_line(tmp_path, capsys):
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"dataset: \xff\xfe\n")
    cases = {"laughs.yaml": (laughs, "aliases"), "big.yaml": (None, "at most"), "bad.yaml": (None, "UTF-8"),
             ".": (None, "directory")}
    for name, (text, words) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        code = main(["compare", "--config", str(path), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], (name, err)
    assert not (tmp_path / "o").exists()


def test_retrain_refuses_zero_epochs_and_keys_it_would_ignore_and_takes_dot(tmp_path, capsys, monkeypatch):
    run = tmp_path / "r"
    assert main(["run", "--dataset", "digits", "--backbone", "mobilenetv1_cifar_025", "--method", "scratch",
                 "--target-mmacs", "3", "--set", "backbone_options.width_mult=0.25", "--epochs", "1",
                 "--seed-epochs", "1", "--rounds", "0", "--no-latency", "--no-progress", "--out", str(run)]) == 0
    capsys.readouterr()
    for extra, words in ((["--epochs", "0"], "must be >= 1"), (["--set", "rounds=2"], "'rounds' cannot be set"),
                         (["--set", "method=fast"], "'method' cannot be set")):
        try:
            code = main(["retrain", str(run), "--no-progress", "--no-latency", *extra])
        except SystemExit as e:  # argparse's refusal of a flag's value (one line, exit code 2 too)
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], (extra, err)
    assert not (tmp_path / "r-retrain").exists()
    monkeypatch.chdir(run)  # "." is the run directory itself; the retraining goes beside it
    assert main(["retrain", ".", "--epochs", "1", "--no-progress", "--no-latency"]) == 0
    res = json.loads((tmp_path / "r-retrain" / "results.json").read_text())
    first = json.loads((run / "results.json").read_text())
    assert res["stages"][0]["widths"] == first["stages"][-1]["widths"] and res["stages"][0]["epochs"] == 1


def _script(name):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_anytime_and_depth_contrasts_read_levels_and_scratch_as_its_own_retraining():
    from types import SimpleNamespace

    ab = _script("ablation")

    def stage(mmacs, acc, train_macs, levels=None):
        st = {"stage": 0, "kind": "round", "epochs": 1, "epochs_total": 1, "test_acc": acc, "test_loss": 1.0,
              "val_acc": None, "train_seconds": 1.0, "history": [], "widths": {"a": 8}, "train_macs": train_macs,
              "cost": {"macs": int(mmacs * 1e6), "mmacs": mmacs, "params": 1, "energy_uj_est": 1.0}}
        return {**st, "levels": levels} if levels else st

    def pair(label, phase, seed, method, st):
        res = {"schema_version": 1, "command": "run", "method": method, "from_scratch": method == "scratch",
               "config": {"method": method, "method_options": {}}, "stages": [st], "status": "done"}
        return SimpleNamespace(label=label, phase=phase, seed=seed), res

    lv = [{"level": 0, "mmacs": 1.0, "test_acc": 0.5, "test_loss": 2.0},
          {"level": 1, "mmacs": 4.0, "test_acc": 0.8, "test_loss": 1.0}]
    pairs = []
    for s, (lo, hi) in enumerate([(0.55, 0.75), (0.45, 0.70)]):
        pairs += [pair("scratch", "curve", s, "scratch", stage(1.0, lo, 1e9)),
                  pair("scratch", "search", s, "scratch", stage(4.0, hi, 3e9)),
                  pair("anytime-osgd", "search", s, "fast", stage(4.0, 0.8, 6e9, lv))]
    m, curve = ab.metrics(pairs)
    assert m[("anytime-osgd L0", "search", 0)][:3] == (50.0, 2.0, 1.0)
    assert m[("scratch", "retrain", 1)] == m[("scratch", "search", 1)]  # scratch is its own retraining
    c = ab.contrast(m, curve, "anytime-osgd L0", "curve", "search", [0, 1])
    # level 0 (50 %) against the curve at 1 MMAC: 55 % and 45 % -> differences -5 and +5, mean 0
    assert c["n"] == 2 and c["top1"]["mean"] == pytest.approx(0.0)
    assert ab.training_ratios(pairs, ("anytime-osgd",)) == {"anytime-osgd": [1.5, 1.5]}  # 6e9 / (1e9 + 3e9)
