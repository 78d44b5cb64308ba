"""The codebase's shape, checked: imports run one way down the layers, no module reaches into
another's private names, the package list and the dependency ranges agree with the tree and the
pins, and the architecture table has one builder per name."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "recsys_moe"

# Bottom to top. A module may import from its own unit (the longest prefix listed here) and from
# any unit of a lower layer; units that share a layer do not import each other.
LAYERS: list[tuple[str, ...]] = [
    (
        "recsys_moe",
        "recsys_moe.allocator",
        "recsys_moe.atomic",
        "recsys_moe.config",
        "recsys_moe.logs",
        "recsys_moe.signals",
        "recsys_moe.threads",
    ),
    ("recsys_moe.features",),  # spec models and the label language
    ("recsys_moe.pipelines",),  # raw data → validated shards + manifest
    ("recsys_moe.kernels",),  # expert-block compute, below the model blocks
    ("recsys_moe.data",),  # shards → batches
    ("recsys_moe.model",),  # embeddings, experts, gates, towers, architectures
    ("recsys_moe.tracking",),  # MLflow and plots
    ("recsys_moe.training",),  # the loop, metrics, checkpoints
    ("recsys_moe.distributed",),  # the sharded engine under torchrun
    ("recsys_moe.scoring",),  # raw rows → scores: the scorer, ranking, batch scoring
    ("recsys_moe.registry",),  # pyfunc packaging, the gate, aliases
    ("recsys_moe.serving",),  # the online endpoint
    # entry points
    ("recsys_moe.report",),
    ("recsys_moe.retrain",),
    ("recsys_moe.demo",),
    ("recsys_moe.cli",),
    ("dags",),
]
UNITS = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in UNITS:
            return ".".join(parts[:n])
    return None


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(tree: ast.AST, importer: str, is_package: bool) -> list[tuple[int, str, list[str]]]:
    """(line, module, names imported from it) for every import of a project module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importer's package
                package = importer if is_package else importer.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".rstrip(".")
            for alias in node.names:
                child = f"{base}.{alias.name}"
                out.append((node.lineno, child, []) if is_module(child) else (node.lineno, base, [alias.name]))
    return [
        (line, m, names)
        for line, m, names in out
        if m.split(".")[0] in ("recsys_moe", "features", "pipelines", "serving")
    ]


def violations(source: str, importer: str, is_package: bool = False) -> list[str]:
    """What is wrong with one module's imports: an import back up the layers or across a layer,
    a top-level `features`/`pipelines`/`serving` (library code lives under recsys_moe), or a
    private name taken from another module."""
    tree = ast.parse(source)
    mine = unit_of(importer)
    assert mine is not None, f"{importer} is in no layer: add its package to LAYERS"
    found = []
    aliases: dict[str, str] = {}  # local name → project module, for `module._private`
    for line, module, names in imported_modules(tree, importer, is_package):
        where = f"{importer}:{line}"
        theirs = unit_of(module)
        if theirs is None:
            found.append(f"{where} imports {module}: not part of the package (library code lives under recsys_moe/)")
            continue
        if theirs != mine and UNITS[theirs] >= UNITS[mine]:
            found.append(f"{where} imports {module}, a layer at or above its own ({theirs} vs {mine})")
        found += [f"{where} takes the private {n} from {module}" for n in names if _private(n) and module != importer]
        if not names:
            aliases[module.rpartition(".")[2]] = module
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
            module = aliases.get(node.value.id)
            if module is not None and module != importer:
                found.append(f"{importer}:{node.lineno} reads the private {module}.{node.attr}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def source_files() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "dags").glob("*.py")])


def test_imports_run_one_way_down_the_layers() -> None:
    found = []
    for path in source_files():
        found += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not found, "\n".join(found)


def test_the_layer_check_catches_what_it_should() -> None:
    """The checker itself, on modules written to break each rule."""
    assert violations("from recsys_moe.serving.app import create_app\n", "recsys_moe.cli") == []
    assert violations("from recsys_moe.model.gates import Gates\n", "recsys_moe.model.mmoe") == []
    back = violations("from recsys_moe.scoring.batch import score_parquet\n", "recsys_moe.model.ranker")
    assert back and "at or above" in back[0]
    across = violations("import recsys_moe.atomic\n", "recsys_moe.config")  # same layer, another unit
    assert across and "at or above" in across[0]
    lazy = violations("def f():\n    from recsys_moe.registry import versions\n", "recsys_moe.training.trainer")
    assert lazy and "recsys_moe.registry.versions" in lazy[0]  # imports inside functions count too
    old = violations("from pipelines.build import build\n", "recsys_moe.cli")
    assert old and "not part of the package" in old[0]
    private = violations("from recsys_moe.training.trainer import _helper\n", "recsys_moe.registry.publish")
    assert private and "private _helper" in private[0]
    attr = violations(
        "from recsys_moe.pipelines.sources import synthetic\nsynthetic._sigmoid(1)\n",
        "recsys_moe.pipelines.sources.criteo",
    )
    assert attr and "synthetic._sigmoid" in attr[0]


def test_every_package_is_declared_and_in_a_layer() -> None:
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent) for p in PACKAGE.rglob("__init__.py")}
    assert declared - {"recsys_moe.specs"} == found, "pyproject.toml [tool.setuptools] packages must list every package"
    assert all(unit_of(p) is not None for p in found)


def test_dependency_ranges_admit_the_pinned_versions() -> None:
    """`pip install .` and `make` install agree: every declared range holds the exact pin."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for name in ("torch.txt", "torchrec.txt", "lock.txt"):
        for line in (ROOT / "requirements" / name).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                package, version = line.split("==")
                pins[re.sub(r"[-_.]+", "-", package.lower())] = version.strip()
    extras = project["optional-dependencies"]
    requirements = [*project["dependencies"], *(r for group in extras.values() for r in group)]
    assert {"serving", "airflow", "gpu", "dev"} <= set(extras)
    for text in requirements:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name.lower())
        if name == "fbgemm-gpu":  # the CUDA build (gpu extra); CPU hosts pin fbgemm-gpu-cpu
            assert req.specifier.contains(pins["fbgemm-gpu-cpu"])
            continue
        assert name in pins, f"{text}: not pinned in requirements/"
        assert req.specifier.contains(pins[name]), f"{text} does not admit the pinned {name}=={pins[name]}"


def test_one_architecture_table() -> None:
    from recsys_moe.config import ARCHITECTURES
    from recsys_moe.model.ranker import ARCH_BUILDERS

    assert list(ARCH_BUILDERS) == list(ARCHITECTURES)


@pytest.mark.parametrize("path", ["features/specs", "dags", "configs"])
def test_top_level_folders_hold_no_library_code(path: str) -> None:
    """Library code is under recsys_moe/; the top-level folders hold specs, DAG files, configs."""
    assert not any((ROOT / path).rglob("__init__.py"))
