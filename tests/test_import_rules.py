"""The import rules of ARCHITECTURE.md: floors, lowest first; a module imports only from its own floor or below.

    0  kernels/                                  Triton and compiled CPU kernels, torch twins, dispatch
    1  relay/ core: relay/*.py, relay/wire/       memory, observation, messages, graph, wire format
    2  compression/, agents/, tasks/             tensor transforms; everything that touches a model; task loaders
    3  relay/runtime/, relay/cli*.py, the API    node execution, runtimes, records, the ``relay`` command
    4  benchmarks/, examples/, tests/            (not checked: they may use anything)

Imports inside functions count too: a lazy upward import is still an upward import. The three floor-2 packages do
not import each other (compression is model-free and tested on random tensors; tasks know nothing of models). Only
the runtime imports ``ray``, only ``agents/`` imports ``transformers``, and module-level imports form no cycle.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("latent_relay", "kernels", "relay", "compression", "agents", "tasks")
#: Third-party imports that only one part of the library may make: the name -> the floors' folders allowed it.
OWNED = {"ray": ("relay/runtime",), "transformers": ("agents",)}


def module_name(path: Path, root: Path) -> str:
    """``relay/wire/encode.py`` -> ``latent_relay.relay.wire.encode`` (the name it is imported under)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts if parts[0] == "latent_relay" else ["latent_relay", *parts])


def floor(module: str) -> tuple[int, str]:
    """The floor of a library module and the part of it (the folder that groups modules of one floor)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top == "kernels":
        return 0, "kernels"
    if top == "relay":
        if len(parts) > 2 and (parts[2] == "runtime" or parts[2].startswith("cli")):
            return 3, "runtime"
        return 1, "relay"
    if top in ("compression", "agents", "tasks"):
        return 2, top
    if top in ("", "__main__"):
        return 3, "api"  # the package's public API and ``python -m latent_relay``
    raise AssertionError(f"{module}: not a library module")


def imports(path: Path, module: str) -> list[tuple[int, str, bool]]:
    """``(line, imported module, at module level)`` for every import in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                base = ".".join([*package, *([base] if base else [])])
            found.append((node.lineno, base, id(node) in top_level))
            # ``from latent_relay.relay import wire`` imports the submodule ``latent_relay.relay.wire``
            found += [(node.lineno, f"{base}.{alias.name}", id(node) in top_level) for alias in node.names]
    return found


def library_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for folder in LIBRARY:
        for path in (root / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                modules[module_name(path, root)] = path
    return modules


def violations(root: Path) -> list[str]:
    """Every import in the library at ``root`` that breaks a rule of the module docstring."""
    modules = library_modules(root)
    found, graph = [], {}
    for module, path in sorted(modules.items()):
        level, part = floor(module)
        where = path.relative_to(root)
        graph[module] = set()
        for line, target, at_top in imports(path, module):
            owner = target.split(".")[0]
            if owner in OWNED and not any(str(where).startswith(allowed) for allowed in OWNED[owner]):
                message = f"{where}:{line}: imports {owner} (only {', '.join(OWNED[owner])} may)"
                found += [] if message in found else [message]
            if target not in modules:
                continue
            if at_top and target != module:
                graph[module].add(target)
            their_level, their_part = floor(target)
            if their_level > level:
                found.append(f"{where}:{line}: floor {level} ({part}) imports {target} from floor {their_level}")
            elif their_level == level == 2 and their_part != part:
                found.append(f"{where}:{line}: {part} imports {target} from {their_part} (floor-2 parts are separate)")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other at module level."""
    state, stack, out = {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                out.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return out


def test_the_library_follows_the_import_rules():
    found = violations(ROOT)
    assert not found, "import rules broken:\n" + "\n".join(found)


def test_every_library_module_has_a_floor():
    for module in library_modules(ROOT):
        floor(module)


@pytest.mark.parametrize(
    "module, line, rule",
    [
        ("relay/graph.py", "from latent_relay.compression.recipes import parse_recipe", "floor 1 (relay) imports"),
        ("relay/memory.py", "from latent_relay.agents import runner", "floor 1 (relay) imports"),
        ("kernels/dispatch.py", "import latent_relay.relay.memory", "floor 0 (kernels) imports"),
        ("compression/scores.py", "from latent_relay.agents.runner import ModelRunner", "floor-2 parts are separate"),
        ("relay/observation.py", "from transformers import DynamicCache", "imports transformers"),
        ("compression/quant.py", "import ray", "imports ray"),
    ],
)
def test_the_rule_catches_an_upward_import(tmp_path, module, line, rule):
    """The check fails on a planted violation, inside a function too (a copy of the library, the tree untouched)."""
    for folder in LIBRARY:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    planted = tmp_path / module
    planted.write_text(planted.read_text() + f"\n\ndef _planted():\n    {line}\n")
    found = violations(tmp_path)
    assert any(module in v and rule in v for v in found), found


def test_the_rule_catches_a_cycle(tmp_path):
    for folder in LIBRARY:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    planted = tmp_path / "relay" / "memory.py"  # relay/messages.py imports relay/memory.py at module level
    planted.write_text("from latent_relay.relay.messages import TextMessage\n" + planted.read_text())
    assert any(v.startswith("import cycle") and "relay.messages" in v for v in violations(tmp_path))


def test_the_public_api_holds_what_users_need():
    import latent_relay

    for name in ("AgentGraph", "Edge", "Node", "LocalRuntime", "RayRuntime", "load_model", "compress", "get_task"):
        assert name in latent_relay.__all__ and getattr(latent_relay, name) is not None


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_use_only_the_public_api(example):
    """An example is what a user copies: it imports nothing private (only ``from latent_relay import <public>``)."""
    import latent_relay

    tree = ast.parse((ROOT / "examples" / example).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("latent_relay") for a in node.names), f"{example}:{node.lineno}"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("latent_relay"):
            assert node.module == "latent_relay", f"{example}:{node.lineno}: imports {node.module}"
            assert {a.name for a in node.names} <= set(latent_relay.__all__), f"{example}:{node.lineno}"
