"""Growability of public models: torchvision and timm classifiers, randomly initialised (no downloads).

For each model, every layer ``growable_layers`` lists from the coupling graph alone (no trial split) is split at
once, one channel each, at ε = 0, and the outputs must stay equal in float64 (relative error ≤ 1e-5): the graph
itself must be right, not only the trial split behind it.  Every other conv / linear layer must be refused with a
reason naming it, and Torch-Pruning's own warnings must not reach the user.
"""
import copy
import warnings
from collections.abc import Callable
from typing import NamedTuple

import pytest
import timm
import torch
import torchvision
from torch import nn

import nas_split as ns
from nas_split.surgery import CouplingGraph, NotGrowableError, SplitScheme
from nas_split.surgery.graph import output_tensors
from nas_split.surgery.split import split_groups


class Case(NamedTuple):
    """A public model, the fewest layers its graph must grow (what it grows today: fewer is a regression), a reason
    one of its refusals must give, and the parameters outside any layer the one nas-split warning must name."""

    build: Callable[[], nn.Module]
    fewest: int
    reason: str
    free_parameters: tuple[str, ...] = ()


ZOO = {
    "resnet18": Case(lambda: torchvision.models.resnet18(weights=None, num_classes=10), 20, "outputs of the model"),
    "densenet121": Case(lambda: torchvision.models.densenet121(weights=None, num_classes=10), 120,
                        "outputs of the model"),
    "shufflenet_v2_x0_5": Case(lambda: torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10), 18,
                               "which splits their dimension into several"),
    "mobilenetv3_small_050": Case(lambda: timm.create_model("mobilenetv3_small_050", num_classes=10), 42,
                                  "outputs of the model"),
    "efficientnet_b0": Case(lambda: timm.create_model("efficientnet_b0", num_classes=10), 65, "outputs of the model"),
    # layer scale 1 (timm's default 1e-6 would hide the MLP branches from the output check)
    "convnext_atto": Case(lambda: timm.create_model("convnext_atto", num_classes=10, ls_init_value=1.0), 12,
                          "a LayerNorm normalises over them", ("stages.0.blocks.0.gamma", "stages.3.blocks.1.gamma")),
    "vit_tiny_patch16_224": Case(lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10), 12,
                                 "a LayerNorm normalises over them", ("cls_token", "pos_embed")),
}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _outputs(model, x):
    with torch.no_grad():
        return torch.cat([t.flatten() for t in output_tensors(model(x))])


def _split_all(model, x, graph, layers):
    """Split channel 0 of every layer in ``layers`` at once (ε = 0) on a copy: one root per set of residual-tied
    producers, which splits the others with it.  Returns the copy and the roots."""
    trial, groups, owned = copy.deepcopy(model), {}, set()
    for name in layers:
        group = graph.group(name)
        if not owned & set(group.producers):
            owned |= set(group.producers)
            groups[name] = group.rebind(trial)
    assert set(layers) <= owned  # every listed layer is split, as a root or tied to one
    split_groups(trial, x, groups, {n: [(0, SplitScheme.s2d())] for n in groups}, 0.0)
    return trial, groups


@pytest.fixture(autouse=True)
def _one_thread():
    """float64 convolutions with groups run one group at a time on CPU, thousands of tiny parallel regions per
    forward: with two OpenMP threads on a busy machine each region can wait out a time slice (measured: 0.1 s to
    20 s for the same forward); one thread takes under a second per model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(ZOO))
def test_every_growable_layer_of_a_public_model_splits_at_once_and_refusals_say_why(name):
    case = ZOO[name]
    model, x = case.build().double().eval(), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = CouplingGraph(model, x)
    messages = [str(w.message) for w in caught]
    assert all(m.startswith("nas-split: parameters ") for m in messages)  # nothing of Torch-Pruning's
    assert len(messages) == bool(case.free_parameters) and all(w.filename == __file__ for w in caught)
    assert all(p in messages[0] for p in case.free_parameters)
    reasons = {}
    layers = ns.growable_layers(model, x, verify=False, graph=graph, reasons=reasons)
    candidates = graph.candidates()
    assert len(layers) >= case.fewest
    assert sorted(layers + list(reasons)) == sorted(candidates)
    for layer, why in reasons.items():
        assert why.startswith(f"layer {layer!r} is not growable: ") and len(why) > len(layer) + 30
        with pytest.raises(NotGrowableError, match="is not growable: ") as e:
            graph.group(layer)
        assert str(e.value) == why
    assert any(case.reason in why for why in reasons.values())

    ref = _outputs(model, x)
    trial, roots = _split_all(model, x, graph, layers)
    modules = dict(trial.named_modules())
    assert all(modules[r].weight.shape[0] == g.width + 1 for r, g in roots.items())
    assert _rel(_outputs(trial, x), ref) <= 1e-5


def test_torch_pruning_warns_where_the_coupling_graph_does_not():
    """The check above could fail: Torch-Pruning, called directly on the ViT, warns about its free parameters."""
    import torch_pruning as tp

    model, x = ZOO["vit_tiny_patch16_224"].build().eval(), torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp.DependencyGraph().build_dependency(model, x)
    assert any("Torch-Pruning will prune the last non-singleton dimension" in str(w.message) for w in caught)


def test_shufflenet_channel_shuffle_and_chunks_are_refused_by_name():
    """ShuffleNet-v2 made Torch-Pruning fail the whole graph (ZeroDivisionError in its reshape index map); its
    branches' inner layers grow, the layers whose channels are shuffled or chunked are refused by name."""
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    reasons = {}
    layers = ns.growable_layers(model, x, verify=False, reasons=reasons)
    assert {"conv1.0", "stage2.0.branch2.0", "stage3.7.branch2.0", "stage4.3.branch2.0", "conv5.0"} <= set(layers)
    shuffle = "ViewBackward0 (2, 48, 4, 4) -> (2, 2, 24, 4, 4), which splits their dimension into several"
    assert shuffle in reasons["stage2.0.branch1.2"]
    assert "its channels are split/chunked" in reasons["stage3.3.branch2.5"]
    assert not any(n.endswith(("branch1.2", "branch2.5")) for n in layers)


class _Shuffled(nn.Module):
    """Two branches concatenated and channel-shuffled (view as 2 x C/2, transpose, view back), then a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.c, self.fc = nn.Conv2d(8, 6, 1), nn.Linear(6, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.relu(self.c(y)).mean((2, 3)))


class _ChannelMean(nn.Module):
    """Gates a feature map by its mean over channels: a coupling no index map expresses (a split changes the mean)."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1), nn.Linear(4, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y * torch.sigmoid(y.mean(1, keepdim=True))
        return self.fc(self.c(y).mean((2, 3)))


def test_a_channel_shuffle_torch_pruning_maps_as_the_identity_is_refused_by_the_graph():
    """Torch-Pruning maps the shuffle's views as the identity, without an error (the graph used to list ``a`` and
    ``b``, and a split of either changed the outputs by 11-13 %); the graph checks the view's shapes and refuses
    them without a trial split."""
    torch.manual_seed(0)
    model, x = _Shuffled().double().eval(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    reasons = {}
    assert ns.growable_layers(model, x, verify=False, reasons=reasons) == ["c"]
    assert set(reasons) == {"a", "b", "fc"}
    assert "ViewBackward0 (2, 8, 8, 8) -> (2, 2, 4, 8, 8), which splits their dimension" in reasons["a"]


def test_verify_leaves_out_a_layer_whose_coupling_the_graph_misses():
    """A mean over channels is elementwise to the tracer: the graph lists ``a``, its split changes the outputs, and
    the trial split (verify=True) leaves it out, saying by how much."""
    torch.manual_seed(0)
    model, x = _ChannelMean().double().eval(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    graph = CouplingGraph(model, x)
    assert ns.growable_layers(model, x, verify=False, graph=graph) == ["a", "c"]
    ref = _outputs(model, x)
    trial, _ = _split_all(model, x, graph, ["a"])
    assert _rel(_outputs(trial, x), ref) > 1e-3
    reasons = {}
    assert ns.growable_layers(model, x, graph=graph, reasons=reasons) == ["c"]
    assert "layer 'a' is not growable: a trial split of it (ε = 0) changes the outputs by a relative" in reasons["a"]


def test_features_only_outputs_torch_pruning_does_not_mark_are_refused():
    """timm's features_only returns block outputs that later blocks also read; Torch-Pruning marks only the last
    one as an output, the graph refuses every layer that writes one (a split would change an output's width)."""
    model = timm.create_model("mobilenetv3_small_050", features_only=True).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph, reasons = CouplingGraph(model, x), {}
    layers = ns.growable_layers(model, x, verify=False, graph=graph, reasons=reasons)
    assert "blocks.0.0.conv_pw" not in layers and "outputs of the model" in reasons["blocks.0.0.conv_pw"]
    assert len(layers) >= 30
    ref = _outputs(model, x)
    trial, _ = _split_all(model, x, graph, layers)
    assert _rel(_outputs(trial, x), ref) <= 1e-5


def test_an_error_of_torch_pruning_on_one_layer_refuses_that_layer_only(monkeypatch):
    import torch_pruning as tp

    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    real = tp.DependencyGraph.get_pruning_group

    def flaky(self, module, fn, idxs):
        if module is model.layer2[0].conv1:
            raise ZeroDivisionError("integer division or modulo by zero")
        return real(self, module, fn, idxs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", flaky)
    reasons = {}
    with torch.no_grad():  # the tracer needs autograd: the graph turns it on for itself
        layers = ns.growable_layers(model, x, verify=False, reasons=reasons)
    assert len(layers) == 19 and "layer2.0.conv1" not in layers
    assert reasons["layer2.0.conv1"] == ("layer 'layer2.0.conv1' is not growable: Torch-Pruning fails on its coupling "
                                         "group (ZeroDivisionError: integer division or modulo by zero)")


def test_an_error_of_the_model_itself_propagates_unchanged():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            raise KeyError("the model's own bug")

    with pytest.raises(KeyError, match="the model's own bug"):
        ns.growable_layers(Broken(), torch.randn(1, 3, 4, 4))


def test_a_model_torch_pruning_cannot_trace_at_all_raises_not_growable(monkeypatch):
    from torch_pruning.dependency import shape_infer

    def broken(graph):
        raise IndexError("list index out of range")

    monkeypatch.setattr(shape_infer, "init_shape_information", broken)
    with pytest.raises(NotGrowableError, match=r"^no layer of Sequential is growable: Torch-Pruning cannot trace its "
                                               r"coupling graph \(IndexError: list index out of range\)$"):
        ns.growable_layers(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)), torch.randn(1, 3, 4, 4))
