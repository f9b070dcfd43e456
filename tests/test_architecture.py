"""The static import graph of the packages (every ``import`` statement, inside functions too, read with ``ast``):
no circle, the core never imports its plugins or the NNI adapter, surgery is layered one way."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nas_split", "search_spaces", "baselines")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, top_level: bool = False) -> set[str]:
    """Modules of the three packages that ``path`` imports (relative imports resolved); with ``top_level``, only the
    imports run when the module is imported (not those inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    for node in (tree.body if top_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] in PACKAGES}
    return out


def graph() -> dict[str, set[str]]:
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges = {}
    for name, path in files.items():
        # an import of a package (or a name from it) is an edge to that package's module; keep known modules only
        edges[name] = {t for t in _imports(path, name) if t in files and t != name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    edges = graph()
    assert len(edges) > 40  # the packages were found
    assert _cycles(edges) == []  # on the tree before this test was written it found the two circles of issue 11


def _nni(module: str) -> bool:
    return module == "nas_split.nni" or module.startswith("nas_split.nni.")


def test_the_core_never_imports_its_plugins_or_the_nni_adapter():
    edges = graph()
    for mod, targets in edges.items():
        if mod.startswith("nas_split") and not _nni(mod) and mod != "nas_split.cli":
            assert not {t for t in targets if t.startswith("baselines")}, mod
            assert not {t for t in targets if _nni(t)}, mod
        if mod.startswith("search_spaces") or mod.startswith("baselines"):
            assert not {t for t in targets if _nni(t)}, mod
        if mod.startswith("search_spaces"):
            assert not {t for t in targets if not t.startswith("search_spaces")}, mod


def test_nni_is_an_adapter_over_the_core():
    """``nas_split.nni.*`` imports the core; nothing imports ``nas_split.nni`` but the CLI, and the CLI only inside
    the functions that need it (``import nas_split.cli`` does not import NNI)."""
    edges = graph()
    adapter = {m for m in edges if _nni(m)}
    assert {f"nas_split.nni.{m}" for m in ("space", "evaluator", "strategy", "experiment", "trials")} < adapter
    assert all(any(t.startswith("nas_split.") and not _nni(t) for t in edges[m]) for m in adapter - {"nas_split.nni"})
    users = {m for m, targets in edges.items() if not _nni(m) and targets & adapter}
    assert users == {"nas_split.cli"}
    assert not {t for t in _imports(ROOT / "nas_split" / "cli.py", "nas_split.cli", top_level=True) if _nni(t)}


def test_surgery_is_layered_one_way():
    _layered("nas_split.surgery", ["handlers", "graph", "optim", "sizes", "blocks", "split", "growable", "export",
                                   "rebuild"])


def test_cost_is_layered_one_way_and_below_the_stages():
    _layered("nas_split.cost", ["shapes", "models", "profiles", "counting", "latency", "registry", "measure"])
    _below("nas_split.cost", {"nas_split.numerics", "nas_split.errors", "nas_split._io"})


def test_growth_sits_below_splitting_and_the_baselines():
    _below("nas_split.growth", {"nas_split.numerics", "nas_split.errors", "nas_split._io", "nas_split.cost",
                                "nas_split.surgery", "nas_split.distributed"})
    edges = graph()
    users = {m for m, t in edges.items() if any(x.startswith("nas_split.growth") for x in t)}
    assert {"nas_split.splitting.analysis", "baselines.variance_transfer", "baselines.firefly"} <= users


def test_surgery_edits_only():
    _below("nas_split.surgery", {"nas_split.numerics", "nas_split.errors", "nas_split._io", "search_spaces"})


def test_no_module_is_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "nas_split").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def _layered(package: str, order: list[str]) -> None:
    """Each module of ``package`` in ``order`` imports none of those after it."""
    edges = graph()
    for i, low in enumerate(order):
        for high in order[i + 1:]:
            assert f"{package}.{high}" not in edges[f"{package}.{low}"], (low, high)


def _below(package: str, allowed: set[str]) -> None:
    """Modules of ``package`` import only each other and modules of ``allowed`` (packages and their modules)."""
    for mod, targets in graph().items():
        if mod == package or mod.startswith(package + "."):
            outside = {t for t in targets if not (t == package or t.startswith(package + "."))}
            assert not {t for t in outside if not any(t == a or t.startswith(a + ".") for a in allowed)}, mod


def test_grower_traces_once_per_step_and_verifies_each_layer_once(monkeypatch):
    import torch

    import nas_split as ns
    import search_spaces
    from nas_split.surgery import CouplingGraph, growable

    traces, trials = [], []
    real_init, real_preserves = CouplingGraph.__init__, growable._preserves
    def counted_init(self, *a, **k):
        traces.append(1)
        real_init(self, *a, **k)

    monkeypatch.setattr(CouplingGraph, "__init__", counted_init)
    monkeypatch.setattr(growable, "_preserves", lambda *a: (trials.append(a[-1].root), real_preserves(*a))[1])
    torch.manual_seed(0)
    model = search_spaces.create("test_mobilenetv1", num_classes=10, in_chans=1, input_size=16)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    grower = ns.Grower(model, x, "fast", grow_ratio=0.5, analysis_batches=1, fast_passes=1)
    candidates = CouplingGraph(model, x).candidates()
    assert len(traces) == 2 and 0 < len(trials) <= len(candidates)  # one trace (plus ours), each candidate once
    traces.clear()
    for step in range(2):
        before = (len(traces), len(trials))
        grower.step([(x, y)])
        grower.neurons()  # the grown architecture: traced again once, no new trial split
        assert (len(traces) - before[0], len(trials) - before[1]) == (1, 0), step
    assert len(set(trials)) == len(trials)  # no layer was verified twice


def test_checking_a_model_again_reuses_its_verdicts_until_its_structure_changes(monkeypatch):
    """Validation before a run, the method's check and the first round's Grower check one model: the trial splits
    run once; a refused layer keeps its reason; a widened model (another structure) is checked again."""
    import torch

    import search_spaces
    from nas_split.surgery import growable, growable_layers, split

    trials = []
    real = growable._preserves
    monkeypatch.setattr(growable, "_preserves", lambda *a: (trials.append(a[-1].root), real(*a))[1])
    torch.manual_seed(0)
    model = search_spaces.create("pointnet_lite", num_classes=10, in_chans=3, input_size=32)
    x = torch.randn(4, 3, 32)
    first, why = growable_layers(model, x, reasons=(r1 := {})), r1
    n = len(trials)
    assert n > 0 and why  # PointNet's feature transform refuses some layers: they are checked too
    second = growable_layers(model, x, reasons=(r2 := {}))
    assert (second, r2, len(trials)) == (first, why, n)  # same verdicts, no trial split
    fresh = search_spaces.create("pointnet_lite", num_classes=10, in_chans=3, input_size=32)
    assert growable_layers(fresh, x) == first and len(trials) == 2 * n  # another model object: checked itself
    split(model, x, {first[0]: [0]}, eps=0.0)
    growable_layers(model, x)
    assert len(trials) == 3 * n  # widened: a new structure, checked again
    flaky = {first[1]}  # a trial split that raised (out of memory, say) is tried again next time

    def once(*a):  # (reference copy, its outputs, inputs, group)
        if a[-1].root in flaky:
            flaky.clear()
            raise growable.NotGrowableError("trial failed") from RuntimeError("out of memory")
        return real(*a)

    monkeypatch.setattr(growable, "_preserves", once)
    other = search_spaces.create("pointnet_lite", num_classes=10, in_chans=3, input_size=32)
    assert first[1] not in growable_layers(other, x) and growable_layers(other, x) == first
