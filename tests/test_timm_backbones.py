"""Every model nas-split registers with timm behaves as timm users use it, before and after growth.

Parametrised over ``search_spaces.mobilenet.TIMM_MODELS``, which every ``@_timm_model`` registration fills, so a
newly registered backbone is covered without editing this file.  Expected values come from the models
themselves by other routes: forward hooks on the modules ``feature_info`` names, spatial sizes from the declared
reductions, timm's ``forward_intermediates``, the eager model for TorchScript.
"""
import subprocess
import sys

import pytest
import timm
import torch
from timm.models import adapt_model_from_string
from torch import nn

import nas_split as ns
import search_spaces
from search_spaces.mobilenet import TIMM_MODELS


def _input(model, batch=2):
    _, h, w = model.pretrained_cfg["input_size"]
    return torch.randn(batch, 3, h, w)


def _hooked(model, x):
    """The outputs of the modules ``model.feature_info`` names, captured by forward hooks."""
    modules, out, hooks = dict(model.named_modules()), {}, []
    for e in model.feature_info:
        hooks.append(modules[e["module"]].register_forward_hook(lambda _m, _i, o, k=e["module"]: out.setdefault(k, o)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [out[e["module"]] for e in model.feature_info]


def test_every_nas_split_timm_model_is_listed():
    assert len(TIMM_MODELS) == 9 and set(TIMM_MODELS) <= set(timm.list_models())
    assert set(TIMM_MODELS) <= set(search_spaces.list())


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_forward_backward_at_default_config(name):
    model = timm.create_model(name, pretrained=False, num_classes=7)
    x = _input(model)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_default_config_names_and_classifier_reset(name):
    model = timm.create_model(name, pretrained=False, num_classes=7, in_chans=2).eval()
    cfg, modules = model.pretrained_cfg, dict(model.named_modules())
    first, head = modules[cfg["first_conv"]], modules[cfg["classifier"]]
    assert isinstance(first, nn.Conv2d) and first.in_channels == 2
    assert isinstance(head, nn.Linear) and head.out_features == 7 and head.in_features == model.num_features
    assert model.get_classifier() is head
    x = torch.randn(2, 2, *cfg["input_size"][1:])
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert torch.allclose(model(x), pooled, atol=1e-6)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_features_only_default_levels(name):
    full = timm.create_model(name, pretrained=False)
    levels = full.feature_info
    torch.manual_seed(1)
    feats = timm.create_model(name, pretrained=False, features_only=True).eval()
    x = _input(full)
    with torch.no_grad():
        outs = feats(x)
    assert len(outs) == len(levels) >= 3  # one level per remaining stride: at least three at the default size
    assert feats.feature_info.channels() == [o.shape[1] for o in outs] == [e["num_chs"] for e in levels]
    assert feats.feature_info.reduction() == [x.shape[-1] // o.shape[-1] for o in outs]
    assert "classifier" not in feats.pretrained_cfg
    torch.manual_seed(1)  # the same weights as a classifier: the wrapper returns its hooked activations
    ref = _hooked(timm.create_model(name, pretrained=False).eval(), x)
    assert all(torch.equal(a, b) for a, b in zip(outs, ref, strict=True))


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_features_only_explicit_indices_and_classes(name):
    n = len(timm.create_model(name, pretrained=False).feature_info)
    f = timm.create_model(name, pretrained=False, features_only=True, out_indices=(0, n - 1)).eval()
    x = _input(f, 1)
    with torch.no_grad():
        outs = f(x)
        assert [o.shape[1] for o in outs] == f.feature_info.channels() and len(outs) == 2
        d = timm.create_model(name, pretrained=False, features_only=True, feature_cls="dict", out_indices=(-1,))(x)
    assert list(d) == [str(n - 1)] and d[str(n - 1)].shape[1] == outs[-1].shape[1]
    with pytest.raises(ValueError, match=f"declares {n} feature levels"):
        timm.create_model(name, pretrained=False, features_only=True, out_indices=(n,))


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_forward_intermediates_match_feature_modules(name):
    model = timm.create_model(name, pretrained=False).eval()
    x = _input(model, 1)
    with torch.no_grad():
        inter = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(inter, _hooked(model, x), strict=True))


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_torchscript_matches_eager(name):
    model = timm.create_model(name, pretrained=False).eval()
    x = _input(model, 1)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)


def test_small_input_feature_example_from_the_issue():
    f = timm.create_model("mobilenetv1_cifar_050", pretrained=False, features_only=True)
    outs = f(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == f.feature_info.channels() == [64, 128, 256, 512]
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4]


# After growth: split a residual stream (its stage's feature level widens), an expansion and the stem.
_PLANS = {"mobilenetv2_050": {"blocks.1.0.conv_pwl": [0, 3, 5], "blocks.3.0.conv_pw": [1], "conv_stem": [2]},
          "mobilenetv1_cifar_025": {"blocks.1.0.conv_pw": [0, 1], "blocks.4.1.conv_pw": [7], "conv_stem": [2]}}


def _grown(name, x):
    model = search_spaces.create(name, num_classes=6, in_chans=3, input_size=x.shape[-1])
    before = [e["num_chs"] for e in model.feature_info]
    ns.split(model, x, _PLANS[name], eps=0.05, generator=torch.Generator().manual_seed(0))
    after = [e["num_chs"] for e in model.feature_info]
    assert after != before  # the plan widens at least one feature level
    return model.eval()


@pytest.mark.parametrize("name", sorted(_PLANS))
def test_grown_model_exports_as_a_feature_extractor(name, tmp_path):
    x = torch.randn(2, 3, 64, 64) if name == "mobilenetv2_050" else torch.randn(2, 3, 32, 32)
    model = _grown(name, x)
    ref = _hooked(model, x)
    assert [e["num_chs"] for e in model.feature_info] == [r.shape[1] for r in ref]
    ns.save_grown(model, tmp_path / "grown.pt")

    loaded = search_spaces.features(ns.load_grown(tmp_path / "grown.pt")).eval()  # the shape-string-free path
    with torch.no_grad():
        outs = loaded(x)
    assert loaded.feature_info.channels() == [r.shape[1] for r in ref]
    assert all(torch.equal(a, b) for a, b in zip(outs, ref, strict=True))

    payload = torch.load(tmp_path / "grown.pt", weights_only=True)  # timm's own path: shape string
    base = timm.create_model(name, pretrained=False, num_classes=6, **payload["spec"]["kwargs"],
                             **({"img_size": 32} if "cifar" in name else {}))
    rebuilt = adapt_model_from_string(base, payload["timm_shape_string"])
    rebuilt.load_state_dict(payload["state_dict"])
    feats = search_spaces.features(rebuilt, out_indices=(1, -1)).eval()
    with torch.no_grad():
        outs = feats(x)
    assert feats.feature_info.channels() == [ref[1].shape[1], ref[-1].shape[1]]
    assert torch.equal(outs[0], ref[1]) and torch.equal(outs[1], ref[-1])


def test_grown_feature_extractor_in_a_fresh_process(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    model = _grown("mobilenetv1_cifar_025", x)
    ns.save_grown(model, tmp_path / "g.pt")
    chans = [r.shape[1] for r in _hooked(model, x)]
    code = (f"import torch, nas_split as ns, search_spaces as ss; f = ss.features(ns.load_grown(r'{tmp_path}/g.pt'));"
            " print(*[o.shape[1] for o in f(torch.randn(1, 3, 32, 32))])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [int(c) for c in p.stdout.split()] == chans


def test_grown_timm_create_model_models_and_a_user_module_reload_in_a_fresh_process(tmp_path):
    from search_spaces.mlp import MLP

    x = torch.randn(2, 2, 48, 48)
    saved = {}
    for name, plan in (("mobilenetv2_035", {"blocks.2.0.conv_pw": [0, 5], "conv_stem": [1]}),
                       ("mobilenetv1_100", {"blocks.1.0.conv_pw": [3], "conv_stem": [0, 2]})):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=5, in_chans=2)
        ns.split(model, x, plan, eps=0.05, generator=torch.Generator().manual_seed(0))
        ns.save_grown(model, tmp_path / f"{name}.pt")  # no spec: inferred from timm's registry and checked
        assert torch.load(tmp_path / f"{name}.pt", weights_only=True)["spec"] == \
            {"timm": name, "kwargs": {"num_classes": 5, "in_chans": 2}}
        with torch.no_grad():
            saved[name] = model.eval()(x)
    user = MLP(3, 2 * 48 * 48, (6,)).eval()
    ns.split(user, x, {"features.1": [1, 4]}, eps=0.05)  # the user's module grows too (6 -> 8 hidden units)
    assert user.features[1].out_features == 8
    ns.save_grown(user, tmp_path / "user.pt", spec={"factory": "search_spaces.mlp:MLP",
                                                    "kwargs": {"num_classes": 3, "in_features": 2 * 48 * 48,
                                                               "widths": [6]}})
    with torch.no_grad():
        saved["user"] = user(x)
    torch.save({"x": x, **saved}, tmp_path / "ref.pt")
    code = (f"import torch, nas_split as ns; from search_spaces.mlp import MLP; r = torch.load(r'{tmp_path}/ref.pt');"
            f" ms = {{n: ns.load_grown(rf'{tmp_path}/{{n}}.pt') for n in ('mobilenetv2_035', 'mobilenetv1_100')}};"
            f" ms['user'] = ns.load_grown(r'{tmp_path}/user.pt', factories={{'search_spaces.mlp:MLP': MLP}});"
            " print(*[torch.equal(m.eval()(r['x']), r[n]) for n, m in ms.items()])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "True", "True"]


def test_save_grown_says_what_to_pass_for_an_unknown_model(tmp_path):
    with pytest.raises(ValueError, match=r"pass spec=\{'factory'"):
        ns.save_grown(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m.pt")
