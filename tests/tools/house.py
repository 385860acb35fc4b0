#!/usr/bin/env python3
"""The house rules of src/: no file over 600 lines, and no import circle
between modules.

A module's imports are the `use`/path references that name another module
of this crate (`crate::a::b`, `super::x`, `self::x`), resolved to the
module file that defines it. A circle is a cycle in that graph, ignoring
the edges between a module and its own ancestors (a child naming its
parent's items, and the parent declaring the child, are one unit).
Prints each problem; exits 1 if there is any.
"""

import os
import re
import sys

ROOT = os.environ.get("HOUSE_SRC") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")
MAX_LINES = 600


def module_of(path):
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    if rel and rel[0] == "bin":
        return None
    return tuple(rel)


def files():
    for dirpath, _, names in os.walk(ROOT):
        for n in names:
            if n.endswith(".rs"):
                yield os.path.join(dirpath, n)


def strip_tests(text):
    # Test modules may reach anywhere; only the code's own structure counts.
    m = re.search(r"\n#\[cfg\(test\)\]\nmod tests \{", text)
    return text[: m.start()] if m else text


def main():
    problems = []
    modules = {}
    for f in files():
        with open(f) as fh:
            text = fh.read()
        n = text.count("\n")
        if n > MAX_LINES:
            problems.append(f"{os.path.relpath(f, ROOT)}: {n} lines (more than {MAX_LINES})")
        m = module_of(f)
        if m is not None:
            modules[m] = strip_tests(text)
    known = set(modules)

    def resolve(base, parts):
        # The longest known module named by `parts` from `base`.
        path = list(base)
        for i, p in enumerate(parts):
            if p == "super":
                path = path[:-1]
            elif p == "self":
                pass
            elif p == "crate":
                path = []
            else:
                parts = parts[i:]
                break
        else:
            parts = []
        best = tuple(path)
        cur = list(path)
        for p in parts:
            cur.append(p)
            if tuple(cur) in known:
                best = tuple(cur)
            else:
                break
        return best

    edges = {m: set() for m in modules}
    pattern = re.compile(r"\b((?:crate|super|self)(?:::[a-z_][a-z0-9_]*)+)")
    for m, text in modules.items():
        for ref in pattern.findall(text):
            target = resolve(m, ref.split("::"))
            if target == m or m[: len(target)] == target or target[: len(m)] == m:
                continue  # itself, an ancestor, or a descendant
            edges[m].add(target)

    # Cycles: Tarjan's strongly connected components.
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    for comp in out:
        names = sorted("::".join(c) or "crate" for c in comp)
        detail = "; ".join(
            f"{'::'.join(a)} -> {'::'.join(b)}" for a in sorted(comp) for b in sorted(edges[a]) if b in comp
        )
        problems.append(f"import circle between {', '.join(names)} ({detail})")
    for p in problems:
        print(p)
    print(f"{len(modules)} modules, {sum(len(e) for e in edges.values())} imports between them, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
