"""DESIGN.md's import rules, checked on the source: every `import lmforge.X` / `from lmforge.X import`
anywhere in a package's modules (function-level imports included) must name a package the rules
allow. Stages talk through files in the run directory, not through each other's internals."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"
FOUNDATION = {"errors", "rundir", "config", "log"}

# package -> the lmforge packages/modules it may import besides itself and the foundation;
# None = no rule beyond "nothing imports cli".
ALLOWED = {
    "model": set(),
    "tokenizer": {"data", "recipe"},  # reads the corpus shards; its stage entry takes the recipe's context
    "infer": {"model", "tokenizer"},
    "train": {"model", "tokenizer", "infer", "data", "recipe"},
    "posttrain": {"train", "infer", "model", "tokenizer", "data", "recipe"},  # data: the built-in sets read corpus files
    "eval": {"model", "tokenizer", "infer", "data", "recipe"},
    "serve": {"infer", "tokenizer"},
}
FORBIDDEN_EVERYWHERE = {"cli"}


def _imports(path: Path) -> set[str]:
    """The top-level lmforge sub-package or module each import in `path` names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "lmforge":
                names = [f"lmforge.{a.name}" for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "lmforge" and len(parts) > 1:
                found.add(parts[1])
    return found


def _modules(package: str) -> list[Path]:
    root = SRC / package
    return sorted(root.rglob("*.py")) if root.is_dir() else []


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_follow_design(package):
    allowed = ALLOWED[package] | FOUNDATION | {package}
    bad = []
    for f in _modules(package):
        for name in sorted(_imports(f) - allowed):
            bad.append(f"{f.relative_to(SRC)} imports lmforge.{name}")
    assert not bad, "import rules of DESIGN.md broken:\n" + "\n".join(bad)


def test_nothing_imports_the_cli():
    bad = [str(f.relative_to(SRC)) for f in SRC.rglob("*.py") if f.name not in ("cli.py", "__main__.py") and _imports(f) & FORBIDDEN_EVERYWHERE]
    assert not bad, f"modules importing lmforge.cli: {bad}"


def test_the_checker_sees_function_level_and_from_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import lmforge.model.io\nfrom lmforge import train\ndef f():\n    from lmforge.eval.harness import x\n")
    assert _imports(f) == {"model", "train", "eval"}
