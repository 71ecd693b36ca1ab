"""The project's shape: the layers import one way (configs <- cluster <- actors <- rewards <- learner,
DESIGN §4), no module imports itself back through others (function-level imports included), and the
license file is the one pyproject.toml names."""

import ast
import os

LAYERS = ["configs", "cluster", "actors", "rewards", "learner"]
ROOT = os.path.join(os.path.dirname(__file__), "..")


def bare(name: str | None) -> str | None:
    """gfnlm.learner.cli -> learner.cli (the layer's name first); other modules as they are."""
    return name[len("gfnlm."):] if name and name.startswith("gfnlm.") else name


def absolute_imports(path: str) -> list[str]:
    """The absolute module names a file imports."""
    names = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_the_project_is_imported_under_its_one_name():
    """Every import of a layer goes through gfnlm. (a bare `configs` would be the user's own
    package outside a checkout, and a second copy of ours inside one)."""
    files = [os.path.join(d, n) for pkg in [*LAYERS, "tests"] for d, _, ns in os.walk(os.path.join(ROOT, pkg))
             for n in ns if n.endswith(".py")]
    assert len(files) > 60
    bad = [(os.path.relpath(f, ROOT), m) for f in files for m in absolute_imports(f) if m.split(".")[0] in LAYERS]
    assert bad == []


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (relative imports resolved)."""
    raw = {}
    for pkg in LAYERS:
        for name in os.listdir(os.path.join(ROOT, pkg)):
            if not name.endswith(".py"):
                continue
            mod = pkg if name == "__init__.py" else f"{pkg}.{name[:-3]}"
            deps = set()
            for node in ast.walk(ast.parse(open(os.path.join(ROOT, pkg, name)).read())):
                if isinstance(node, ast.ImportFrom):
                    base = pkg if node.level == 1 else bare(node.module) if not node.level else None
                    module = f"{pkg}.{node.module}" if node.level == 1 and node.module else base
                    if module and module.split(".")[0] in LAYERS:
                        deps.add(module)
                        deps.update(f"{module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(bare(a.name) for a in node.names if bare(a.name).split(".")[0] in LAYERS)
            raw[mod] = deps
    return {m: {d for d in deps if d in raw and d != m} for m, deps in raw.items()}


def test_the_layers_import_only_downward():
    rank = {p: i for i, p in enumerate(LAYERS)}
    graph = import_graph()
    upward = sorted((m, d) for m, deps in graph.items() for d in deps if rank[d.split(".")[0]] > rank[m.split(".")[0]])
    assert upward == []


def test_no_module_imports_itself_back():
    graph = import_graph()
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []


def test_both_drivers_implement_the_driver_protocol():
    """The loop, checkpoints and reporting ask a driver only what `learner.driver.Driver` writes down;
    both drivers have every member (methods on the class, attributes set when it is built)."""
    import inspect

    from gfnlm.learner.distributed import RayDriver
    from gfnlm.learner.driver import MEMBERS, Driver
    from gfnlm.learner.loop import LocalDriver

    declared = {n for n in vars(Driver) if not n.startswith("_")} | set(Driver.__annotations__)
    assert declared == set(MEMBERS)
    for cls in (LocalDriver, RayDriver):
        built = "".join(inspect.getsource(k.__init__) for k in cls.__mro__ if "__init__" in vars(k) and k is not object)
        missing = [n for n in MEMBERS if not callable(getattr(cls, n, None)) and f"self.{n} =" not in built
                   and f"self.{n}:" not in built]
        assert missing == [], (cls.__name__, missing)


def test_the_license_file_is_the_one_pyproject_names():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["license"]["text"]
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert declared == "Apache-2.0" and "Apache License" in text and "Version 2.0, January 2004" in text
