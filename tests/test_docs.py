"""The documentation points at things that exist: every relative link of README.md and docs/*.md resolves (files,
and ``#anchors`` to headings of the target, GitHub's slugs), every module docs/architecture.md names is in the tree,
and the layers it draws hold in the import graph."""
from __future__ import annotations

import re
from pathlib import Path

from test_architecture import graph

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nas_split", "baselines", "search_spaces")
ARCHITECTURE = ROOT / "docs" / "architecture.md"

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
# [text](target) and ![alt](target), text may hold one level of brackets; an optional "title" after the target
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fence = [], None
    for no, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append((no, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (links and code marks dropped), lowercase, every character but
    letters, digits, ``_``, ``-`` and spaces removed, spaces turned into ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file: heading slugs (a repeated one gets ``-1``, ``-2``, ...) and HTML anchors."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose(path.read_text()):
        m = _HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
        out |= set(_HTML_ANCHOR.findall(line))
    return out


def paragraphs(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of the prose's paragraphs (a code span may run over a line break)."""
    out: list[tuple[int, str]] = []
    last = None
    for no, line in prose(text):
        if line.strip() and last is not None and no == last + 1 and out:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
        elif line.strip():
            out.append((no, line))
        last = no if line.strip() else None
    return out


def code_spans(text: str) -> list[str]:
    """The contents of the prose's code spans."""
    return [m.group(2) for _, para in paragraphs(text) for m in _CODE_SPAN.finditer(para)]


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code blocks and code spans."""
    out = []
    for first, para in paragraphs(text):
        plain = _CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), para)  # same offsets, no code
        out += [(first + plain.count("\n", 0, m.start()), m.group(1)) for m in _LINK.finditer(plain)]
    return out


def broken(path: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``path`` that do not resolve inside ``root``, as ``file:line: target (why)``."""
    out = []
    for no, target in links(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...: not checked
            continue
        where, _, fragment = target.partition("#")
        dest = (path.parent / where).resolve() if where else path
        why = None
        if not dest.exists():
            why = "no such file"
        elif root not in dest.parents and dest != root:
            why = "outside the repository"
        elif fragment:
            if dest.suffix != ".md":
                why = "an anchor into a file that is not Markdown"
            elif fragment not in anchors(dest):
                why = f"no heading with anchor #{fragment} in {dest.relative_to(root)}"
        if why:
            out.append(f"{path.relative_to(root)}:{no}: {target} ({why})")
    return out


def test_slugs_follow_github():
    assert slug("Search → export → retrain") == "search--export--retrain"
    assert slug("Comparing methods: `nas-split compare`") == "comparing-methods-nas-split-compare"
    assert slug("Can the benchmark see an architecture effect? The ablation of splitting's choice") == \
        "can-the-benchmark-see-an-architecture-effect-the-ablation-of-splittings-choice"
    assert slug("Datasets (`nas_split.data`)") == "datasets-nas_splitdata"
    assert slug("Cost models: pricing for your device") == "cost-models-pricing-for-your-device"


def test_the_link_checker_finds_links_and_catches_broken_ones(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Same\n\n## Same\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n"
        "[ok](other.md) [ok](other.md#other-page) [ok](other.md#same-1) [ok](#title) ![img](other.md)\n"
        "[missing](nothing.md) [bad anchor](other.md#nope) [bad local](#nope) [web](https://example.org/x)\n"
        "`[in a code span](nothing.md)` `a code span over\n[a line break](nothing.md)`\n"
        "```\n[in a code block](nothing.md)\n```\n")
    assert len(links(page.read_text())) == 9
    problems = broken(page, root=tmp_path)
    assert len(problems) == 3, problems
    assert "nothing.md (no such file)" in problems[0]
    assert "#nope" in problems[1] and "#nope" in problems[2]


def test_every_relative_link_resolves():
    pages = docs()
    assert len(pages) >= 10  # README and the docs/ pages were found
    found = sum(len(links(p.read_text())) for p in pages)
    assert found > 40, found  # the extractor sees the links (README alone has more than 20)
    assert len(links((ROOT / "README.md").read_text())) > 20
    problems = [b for p in pages for b in broken(p)]
    assert not problems, "\n".join(problems)


# --- docs/architecture.md against the tree -----------------------------------------------------------------------

_PATH = re.compile(r"(?<![\w./-])((?:[A-Za-z_][\w-]*/)*[A-Za-z_]\w*\.py|(?:[A-Za-z_]\w*/)+)(?![\w/-])")
_DOTTED = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?!\w)")
_FILE_SUFFIX = (".py", ".md", ".json", ".yaml", ".pt", ".png", ".csv")
_TREE = ("nas_split", "baselines", "search_spaces", "tests", "benchmarks", "docs")


def _tree_files() -> list[str]:
    return [p.relative_to(ROOT).as_posix() for top in _TREE for p in (ROOT / top).rglob("*")
            if "__pycache__" not in p.parts]


def _code(text: str) -> list[str]:
    """Code spans of the prose and the lines of code blocks: where the page names modules."""
    inside = {no for no, _ in prose(text)}
    blocks = [line for no, line in enumerate(text.splitlines(), 1) if no not in inside and not _FENCE.match(line)]
    return blocks + code_spans(text)


def named_paths(text: str) -> set[str]:
    """``foo.py``, ``surgery/graph.py``, ``nas_split/foo.py``, ``splitting/`` as the page writes them."""
    return {m.group(1) for chunk in _code(text) for m in _PATH.finditer(chunk)}


def named_dotted(text: str) -> set[str]:
    """``nas_split.foo.bar``, ``engine.grow_rounds``: dotted names whose first part is a package or a module of
    ``nas_split``."""
    out = set()
    for chunk in _code(text):
        for m in _DOTTED.finditer(chunk):
            first = m.group(1).split(".")[0]
            if m.group(1).endswith(_FILE_SUFFIX):  # a file name, checked as a path
                continue
            if first in PACKAGES or (ROOT / "nas_split" / f"{first}.py").exists() or \
                    (ROOT / "nas_split" / first / "__init__.py").exists():
                out.add(m.group(1))
    return out


def resolve_path(name: str, files: list[str]) -> bool:
    """Whether a file (``x.py``) or folder (``x/``) of that name, with that tail of folders, is in the tree."""
    if name.endswith("/"):
        return any(f"/{name}" in f"/{f}/" for f in files)
    return any(f"/{f}".endswith(f"/{name}") for f in files)


def resolve_dotted(name: str) -> bool:
    """Whether ``a.b.c`` is a module of the tree, or a module followed by a name its source defines or imports
    (for a short form, ``engine.x`` is ``nas_split.engine.x``)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        parts = ["nas_split", *parts]
    for k in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:k])
        source = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if source.exists():
            rest = parts[k:]
            if not rest:
                return True
            if len(rest) > 2:  # module.Class.member at most
                return False
            return re.search(rf"\b{re.escape(rest[0])}\b", source.read_text()) is not None
    return False


def test_the_module_resolvers_can_fail():
    files = _tree_files()
    assert resolve_path("surgery/graph.py", files) and resolve_path("splitting/", files)
    assert resolve_path("nas_split/engine.py", files) and resolve_path("cli.py", files)
    assert not resolve_path("surgery/nothing.py", files) and not resolve_path("nowhere/", files)
    assert not resolve_path("splitting/graph.py", files)  # the file exists, but in surgery/
    assert resolve_dotted("nas_split.growth.rates") and resolve_dotted("engine.grow_rounds")
    assert resolve_dotted("nas_split.surgery.register_handler") and resolve_dotted("surgery.split")
    assert not resolve_dotted("nas_split.nothing") and not resolve_dotted("engine.no_such_function")
    text = "`nas_split/foo.py` and `surgery/graph.py`, `nas_split.engine.grow_rounds`\n```\ncli.py  data/\n```\n"
    assert named_paths(text) == {"nas_split/foo.py", "surgery/graph.py", "cli.py", "data/"}
    over_a_break = "`a span over\na line break`, then `search_spaces/mobilenet.py`"
    assert named_paths(over_a_break) == {"search_spaces/mobilenet.py"}
    assert named_dotted(text) == {"nas_split.engine.grow_rounds"}


def test_every_module_architecture_names_exists():
    text = ARCHITECTURE.read_text()
    files = _tree_files()
    paths, dotted = named_paths(text), named_dotted(text)
    assert len(paths) > 40, sorted(paths)  # the extractor sees the modules of the layer diagram and the tables
    assert {"cli.py", "engine.py", "surgery/", "rates.py", "nni/", "search_spaces/mobilenet.py"} <= paths
    assert len(dotted) > 5, sorted(dotted)
    missing = sorted(p for p in paths if not resolve_path(p, files))
    missing += sorted(d for d in dotted if not resolve_dotted(d))
    assert not missing, missing


def _layers(text: str) -> list[list[str]]:
    """The modules of each line of the diagram under "## The layers", top to bottom (continuation lines skipped)."""
    block = text[text.index("## The layers"):]
    block = block[block.index("```") + 3:]
    block = block[block.index("\n") + 1:block.index("```")]
    rows = []
    for line in block.splitlines():
        if not line or line[0].isspace():
            continue
        names = []
        for token in line.split():
            if not re.fullmatch(r"[\w]+\.py|[\w]+/", token):
                break
            names.append(token)
        rows.append(names)
    return rows


def test_the_layers_drawn_hold_in_the_import_graph():
    rows = _layers(ARCHITECTURE.read_text())
    assert len(rows) > 10 and rows[0] == ["cli.py"]
    level = {}
    for i, names in enumerate(rows):
        for name in names:
            level[name.removesuffix(".py").removesuffix("/")] = i
    edges = graph()
    modules = [m for m in edges if m.startswith("nas_split.")]
    unplaced = sorted(m for m in modules if m.split(".")[1] not in level)
    assert not unplaced, f"modules the diagram omits: {unplaced}"
    upward = sorted((m, t) for m in modules for t in edges[m]
                    if t.startswith("nas_split.") and level[t.split(".")[1]] < level[m.split(".")[1]])
    assert not upward, f"imports of a module drawn above: {upward}"
