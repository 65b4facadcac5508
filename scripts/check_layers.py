#!/usr/bin/env python3
"""Checks that the library's top-level modules depend on each other one way only.

Reads every `src/**/*.rs` outside `src/bin` (test modules and comments left out), collects the
modules each one names through `crate::module`, `use crate::{module, ...}` or an item the crate
root re-exports, prints the graph and a layer order, and exits 1 if there is a cycle.
"""
import glob
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def code_of(path):
    text = open(path, encoding="utf-8").read()
    cut = text.find("#[cfg(test)]\nmod tests")
    if cut >= 0:
        text = text[:cut]
    return "\n".join(l for l in text.split("\n") if not l.strip().startswith("//"))


def root_exports():
    """Item name -> module, from the `pub use module::{...}` lines of src/lib.rs."""
    out = {}
    lib = code_of(os.path.join(ROOT, "src/lib.rs"))
    for m in re.finditer(r"pub use (\w+)::(\{[^;]*\}|\w+);", lib, re.S):
        for item in re.split(r"[,\s{}]+", m.group(2)):
            if item:
                out[item] = m.group(1)
    return out


def main():
    exports = root_exports()
    graph = {}
    files = glob.glob(os.path.join(ROOT, "src/**/*.rs"), recursive=True)
    for path in files:
        rel = os.path.relpath(path, os.path.join(ROOT, "src"))
        if rel.startswith("bin") or rel == "lib.rs":
            continue
        top = rel.split(os.sep)[0].removesuffix(".rs")
        text = code_of(path)
        deps = graph.setdefault(top, set())
        for name in re.findall(r"crate::(\w+)", text):
            deps.add(exports.get(name, name))
        for m in re.finditer(r"use crate::\{([^;]*)\};", text, re.S):
            for part in re.split(r"[,\s]+", m.group(1)):
                name = part.split("::")[0].strip("{} ")
                if name:
                    deps.add(exports.get(name, name))
    for top in graph:
        graph[top] = {d for d in graph[top] if d in graph and d != top}
    for top in sorted(graph):
        print(f"{top} -> {', '.join(sorted(graph[top])) or '-'}")
    state, order, cycles = {}, [], []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif not state.get(dep):
                visit(dep, stack)
        stack.pop()
        state[node] = 2
        order.append(node)

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [])
    if cycles:
        for c in cycles:
            print("cycle: " + " -> ".join(c))
        return 1
    print("no cycle; layers from the bottom: " + " -> ".join(order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
