"""The layout rules (README, "Layout"): the library imports neither bench/ nor experiments/ and reads no docs/;
the stage scripts stay short (each wires mme/ pieces)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_library_reaches_no_further_than_itself():
    outside = {p.stem for d in ("bench", "experiments") for p in (ROOT / d).glob("*.py")} | {"bench", "experiments"}
    for path in (ROOT / "mme").rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & outside, (path, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in outside, (path, node.module)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not node.value.startswith(("docs/", "bench/", "experiments/")), (path, node.value)


def test_stage_scripts_stay_short():
    for script in ("pretrain.py", "finetune.py"):
        assert len((ROOT / script).read_text().splitlines()) < 300, script
