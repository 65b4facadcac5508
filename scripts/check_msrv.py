#!/usr/bin/env python3
"""Fails if a dependency needs a newer Rust than the crate's declared `rust-version`.

Only one toolchain is installed where CI runs, so the MSRV cannot be tested by building with
it. What can be checked without it, and is, here: every package in the resolved dependency
graph (`cargo metadata --locked --all-features`: the normal and build dependencies of every
feature, on every target platform, as `Cargo.lock` pins them; dev-dependencies are skipped,
they do not reach users) must declare no `rust-version` greater than ours. Clippy's
`incompatible_msrv` lint (a default lint, run by `.ci/run`) checks the other half: our own use
of standard-library APIs newer than `rust-version`.

A package that declares no `rust-version` is not counted against us (nothing to read), but is
listed with `--verbose`.

Usage: python3 scripts/check_msrv.py [--verbose]
"""

import json
import subprocess
import sys
from pathlib import Path


def version_tuple(text):
    """`1.85` or `1.85.0` as (1, 85, 0)."""
    parts = [int(p) for p in text.strip().split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    verbose = "--verbose" in sys.argv[1:]
    root_dir = Path(__file__).resolve().parent.parent
    metadata = json.loads(
        subprocess.run(
            [
                "cargo",
                "metadata",
                "--format-version",
                "1",
                "--locked",
                "--all-features",
                "--manifest-path",
                str(root_dir / "Cargo.toml"),
            ],
            check=True,
            stdout=subprocess.PIPE,
        ).stdout
    )
    packages = {p["id"]: p for p in metadata["packages"]}
    root_id = metadata["resolve"]["root"]
    ours = packages[root_id].get("rust_version")
    if not ours:
        print("check_msrv: Cargo.toml declares no rust-version", file=sys.stderr)
        return 1
    nodes = {n["id"]: n for n in metadata["resolve"]["nodes"]}

    # Walk the graph from the crate: its normal and build dependencies, then everything they
    # depend on (cargo lists only normal and build dependencies for packages other than the
    # workspace's own).
    def wanted(dep):
        return any(k["kind"] in (None, "build") for k in dep["dep_kinds"])

    seen = set()
    todo = [d["pkg"] for d in nodes[root_id]["deps"] if wanted(d)]
    while todo:
        pkg = todo.pop()
        if pkg in seen or pkg == root_id:
            continue
        seen.add(pkg)
        todo.extend(d["pkg"] for d in nodes[pkg]["deps"] if wanted(d))

    too_new = []
    undeclared = []
    for pkg in sorted(seen, key=lambda i: (packages[i]["name"], packages[i]["version"])):
        p = packages[pkg]
        declared = p.get("rust_version")
        if not declared:
            undeclared.append(f"{p['name']} {p['version']}")
        elif version_tuple(declared) > version_tuple(ours):
            too_new.append(f"{p['name']} {p['version']} needs Rust {declared}")

    if verbose and undeclared:
        print(f"check_msrv: no rust-version declared by: {', '.join(undeclared)}")
    if too_new:
        print(
            f"check_msrv: Cargo.toml says rust-version = \"{ours}\", but these dependencies "
            "(as Cargo.lock pins them) need a newer Rust:",
            file=sys.stderr,
        )
        for line in too_new:
            print(f"    {line}", file=sys.stderr)
        print(
            "Raise rust-version (and every place that states it), or pin an older version "
            "of the dependency.",
            file=sys.stderr,
        )
        return 1
    print(
        f"check_msrv: {len(seen)} dependencies, none needs more than Rust {ours} "
        f"({len(undeclared)} declare no rust-version)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
