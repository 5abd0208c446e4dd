"""The package's modules import each other without a cycle: every ``import`` and ``from ... import``
of torchtune_blah, at module level and inside functions (a function-level import that closes a
cycle still ties two modules into one), importing a module also importing its parent packages."""

import ast
import os

from conftest import REPO

PACKAGE = "torchtune_blah"
ROOTS = ((os.path.join(REPO, "components", PACKAGE), PACKAGE), (os.path.join(REPO, "recipes"), PACKAGE + ".recipes"))


def modules():
    """{module name: file}: the package's modules, and the recipes as torchtune_blah.recipes.*"""
    out = {}
    for base, prefix in ROOTS:
        for folder, _, files in os.walk(base):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), base)[:-3].replace(os.sep, ".")
                    rel = "" if rel == "__init__" else rel.removesuffix(".__init__")
                    out[prefix + ("." + rel if rel else "")] = os.path.join(folder, name)
    return out


def import_graph():
    """{module: modules it imports}, parents of an imported module included."""
    mods = modules()

    def owner(name):  # the module a dotted name lives in (``pkg.mod.func`` -> ``pkg.mod``)
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] != PACKAGE:
                    continue
                found = owner(name)
                while found and found != PACKAGE:
                    if found != module and not module.startswith(found + "."):
                        targets.add(found)
                    found = found.rpartition(".")[0]
        graph[module] = targets
    return graph


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_walk_sees_imports_inside_functions():
    graph = import_graph()
    assert "torchtune_blah.review.agreement" in graph["torchtune_blah.review.db"]  # (export's, inside a method)
    assert "torchtune_blah.data" in graph["torchtune_blah.review.db"]  # (a parent package of data.squad counts)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []
