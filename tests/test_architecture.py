"""The package's shape, checked: the import graph of minimind/*.py is a DAG with errors and runtime at the bottom,
no module hides an import of ours inside a function, and inference never pulls in the training code.

Read off the source with `ast` (nothing is imported), so a reader can trust docs/en/architecture.md.
"""
import ast
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "minimind"
INFERENCE = ["generate", "evaluate", "serve"]                # library modules used to run a trained model
INFERENCE_SCRIPTS = ["eval_model.py", "serve_openai_api.py"]
TRAINING = {"train", "resume", "flags", "runlog"}           # what only training needs


def our_imports(file: Path, package: bool) -> list[tuple[str, bool]]:
    """(module name inside minimind, imported at module level?) for every import of ours in a file."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    for n in tree.body:  # `if`/`try` at module level still run at import time
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(c) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and package:              # from .x import y / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.level == 0 and node.module and node.module.split(".")[0] == "minimind":
                rest = node.module.split(".")[1:]
                names = rest[:1] if rest else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("minimind.")]
        for name in names:
            if (PKG / f"{name}.py").exists():
                out.append((name, id(node) in top))
    return out


def graph() -> dict[str, set[str]]:
    return {f.stem: {m for m, _ in our_imports(f, package=True)} - {f.stem} for f in sorted(PKG.glob("*.py"))}


def reachable(g: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += g.get(m, ())
    return seen


def test_import_graph_is_a_dag():
    g = graph()
    assert len(g) >= 15, sorted(g)   # the walk found the package
    order, state = [], {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(g[m]):
            visit(d, path + [m])
        state[m] = "done"
        order.append(m)
    for m in sorted(g):
        visit(m, [])
    # the bottom of the graph imports nothing of ours
    assert g["errors"] == set() and g["runtime"] <= {"errors"}


def test_no_function_level_import_of_our_own_modules():
    """A late import inside a function is how a cycle hides; the package needs none."""
    late = [f"{f.name}: {m}" for f in sorted(PKG.glob("*.py")) for m, top in our_imports(f, package=True) if not top]
    assert late == []


def test_inference_does_not_import_training():
    g = graph()
    for m in INFERENCE:
        assert not reachable(g, {m}) & TRAINING, (m, sorted(reachable(g, {m}) & TRAINING))
    for script in INFERENCE_SCRIPTS:
        direct = {m for m, _ in our_imports(ROOT / script, package=False)}
        assert not reachable(g, direct) & TRAINING, (script, sorted(reachable(g, direct) & TRAINING))


def test_every_module_says_its_job_first():
    """Each module opens with a docstring: a reader knows its one job from the first line."""
    for f in sorted(PKG.glob("*.py")):
        doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()[0]) > 20, f.name


def test_train_module_stays_small():
    assert len((PKG / "train.py").read_text(encoding="utf-8").splitlines()) <= 400


def test_the_architecture_docs_match_the_code():
    """docs/en|zh/architecture.md: the import table is the real graph, and the picture names every module."""
    g = graph()
    g.pop("__init__")
    for lang in ("en", "zh"):
        doc = (ROOT / "docs" / lang / "architecture.md").read_text(encoding="utf-8")
        table = {}
        for line in doc.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 2 and cells[0] in g:
                table[cells[0]] = set() if cells[1] == "—" else {c.strip() for c in cells[1].split(",")}
        assert table == g, (lang, {m for m in g if table.get(m) != g[m]})
        picture = doc[doc.index("```"):doc.index("```", doc.index("```") + 3)]
        missing = [m for m in g if m not in picture.replace(",", " ").split()]
        assert not missing, (lang, missing)
