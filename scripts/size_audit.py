#!/usr/bin/env python
"""Files over a line budget and functions over a length budget (the project's quality bar:
no file over ~600 lines, no function over ~80), by `ast`:

    python scripts/size_audit.py                       # sigma_moe/ and sigma_moe_kernels/
    python scripts/size_audit.py --rev cc11563          # the same tree at a commit (git show)
    python scripts/size_audit.py --files 600 --functions 80 sigma_moe sigma_moe_kernels

A function's length is its source span (``lineno`` .. ``end_lineno``, decorators, docstring
and comments included); a nested function counts inside its parent and on its own.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _sources(roots: list[str], rev: str | None) -> dict[str, str]:
    """path -> text of every .py file under ``roots`` (in the work tree, or at ``rev``)."""
    if rev is None:
        return {
            str(p.relative_to(REPO)): p.read_text(encoding="utf-8")
            for r in roots
            for p in sorted((REPO / r).rglob("*.py"))
        }
    names = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", rev, "--", *roots],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return {
        n: subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:{n}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
        for n in names
        if n.endswith(".py")
    }


def functions(text: str) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function and method."""
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in child.decorator_list] + [child.lineno])
                out.append((prefix + child.name, start, child.end_lineno - start + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(text), "")
    return out


def audit(sources: dict[str, str], max_file: int, max_fn: int) -> tuple[list, list]:
    big_files = sorted(
        ((p, t.count("\n")) for p, t in sources.items() if t.count("\n") > max_file),
        key=lambda x: -x[1],
    )
    long_fns = sorted(
        (
            (p, name, line, n)
            for p, t in sources.items()
            for name, line, n in functions(t)
            if n > max_fn
        ),
        key=lambda x: -x[3],
    )
    return big_files, long_fns


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("roots", nargs="*", default=["sigma_moe", "sigma_moe_kernels"])
    ap.add_argument("--rev", help="a git commit: audit that tree instead of the work tree")
    ap.add_argument("--files", type=int, default=600, help="line budget of a file (600)")
    ap.add_argument("--functions", type=int, default=80, help="line budget of a function (80)")
    a = ap.parse_args(argv)
    sources = _sources(a.roots, a.rev)
    big_files, long_fns = audit(sources, a.files, a.functions)
    where = a.rev or "work tree"
    print(f"{where}: {len(sources)} files, {sum(t.count(chr(10)) for t in sources.values())} lines")
    print(f"files over {a.files} lines: {len(big_files)}")
    for p, n in big_files:
        print(f"  {n:5d}  {p}")
    print(f"functions over {a.functions} lines: {len(long_fns)}")
    for p, name, line, n in long_fns:
        print(f"  {n:5d}  {p}:{line}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
