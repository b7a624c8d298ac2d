"""The package's shape holds: the math imports nothing of the rest, no module-level import cycle, no module imports
another's private names, research code stays out of the runtime package, and files stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "emd_t2i"
MATH = {"emd_t2i.emd", "emd_t2i.schedule", "emd_t2i.choices"}
MAX_LINES = 420  # "about 400": a file past it is more than one idea


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(module, names) of each `from X import names` / `import X` in a file; with `top_level_only`, not those
    inside functions (imported when called: they cannot make an import cycle)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not run
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def internal_edges(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    edges = set()
    for module, names in imports(path, top_level_only=True):
        if not module.startswith("emd_t2i"):
            continue
        for n in names:  # `from emd_t2i.training import checkpoint` imports a module
            if f"{module}.{n}" in known:
                edges.add(f"{module}.{n}")
        if module in known:
            edges.add(module)
    edges.discard(name)
    return edges


def test_no_module_level_import_cycle():
    known = modules()
    graph = {name: internal_edges(name, path, known) for name, path in known.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_math_imports_nothing_of_the_rest():
    known = modules()
    for name in MATH:
        used = {m for m, _ in imports(known[name], top_level_only=False) if m.startswith("emd_t2i")}
        assert used <= MATH, f"{name} imports {sorted(used - MATH)}"


def test_no_private_names_are_imported_across_modules():
    for name, path in modules().items():
        for module, names in imports(path, top_level_only=False):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not (module.startswith("emd_t2i") and private), f"{name} imports {private} from {module}"


def test_research_code_is_outside_the_runtime_package():
    for name, path in modules().items():
        used = {m for m, _ in imports(path, top_level_only=True)}
        assert not any(m.startswith("tools") for m in used), f"{name} imports research code at import time"


def test_files_stay_readable():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_python_api_is_what_the_readme_shows_and_what_the_cli_calls(tiny_teacher_dir, prompt_file, tmp_path):
    import re

    import emd_t2i
    from emd_t2i.export.sample import sample
    from emd_t2i.training.loop import distill

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## From Python\n.*?```python\n(.*?)```", readme, re.DOTALL).group(1)
    compile(block, "README.md", "exec")
    imported = re.search(r"from emd_t2i import (.*)", block).group(1).split(", ")
    assert set(imported) <= set(emd_t2i.__all__)
    assert emd_t2i.distill is distill and emd_t2i.sample is sample
    # the README's calls, on a tiny teacher
    cfg = emd_t2i.build_config(teacher=str(tiny_teacher_dir), prompts=str(prompt_file), output=str(tmp_path / "run"),
                               iterations=1, batch_size=1, generator_rank=2, fake_rank=2, fake_updates=1,
                               num_validation_prompts=0, device="cpu")
    export = emd_t2i.export_run(emd_t2i.distill(cfg), overwrite=True)
    images = emd_t2i.sample(["a cat"], export).images
    assert len(images) == 1 and images[0].size == (16, 16)  # the tiny teacher: 8x8 latents, a 2x VAE
