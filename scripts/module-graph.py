#!/usr/bin/env python3
"""Prints the module dependency graph of every workspace crate and fails on a cycle.

Usage: scripts/module-graph.py [--all] [--dot] [crate ...]

A module depends on another when its code names it: `use crate::queue::Channel`,
`super::outbox::Outbox`, `crate::config::Options` inside a function, and so on. Edges are drawn
between siblings: `protocol::connection` using `crate::queue::Topic` is the edge
`protocol -> queue` of the crate root's children, and `queue::channel -> queue::in_flight` an
edge among `queue`'s children. A child using its own ancestors (`super::QueueSettings`) is how
Rust modules share a parent's items, not a dependency between modules, so it draws no edge.
Code under `#[cfg(test)]` is left out: tests may reach anywhere.

Without `--all` the graph printed is that of each crate's top-level modules; cycles are looked
for at every level either way, and any one makes the exit status 1.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strip_comments_and_literals(text):
    """The source with comments, strings and char literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if text[i] == "\n":
                        out.append("\n")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and not re.match(r"\w", text[i - 1:i] or " "):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + len(hashes) + 2)
            end = n if end < 0 else end + 1 + len(hashes)
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}'), or a lifetime ('a) which stays.
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", text[i:i + 12])
            if m:
                out.append("' '")
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def skip_item(text, i):
    """The index just past the item starting at `i`: at its `;` or its closing brace."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        elif c == ";" and depth == 0:
            return i + 1
        i += 1
    return i


def strip_test_code(text):
    """The source without the items under `#[cfg(test)]`."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        end = skip_item(text, m.end())
        out.append("\n" * text.count("\n", m.start(), end))
        i = end
    out.append(text[i:])
    return "".join(out)


def expand_use_tree(tree):
    """`a::{b, c::{d, self}}` as the paths [a, b], [a, c, d], [a, c]."""
    tree = re.sub(r"\s+", "", tree)
    paths = []

    def walk(prefix, s):
        # Split `s` at top-level commas.
        parts, depth, start = [], 0, 0
        for k, ch in enumerate(s):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(s[start:k])
                start = k + 1
        parts.append(s[start:])
        for part in filter(None, parts):
            brace = part.find("{")
            if brace >= 0:
                head = [p for p in part[:brace].split("::") if p]
                walk(prefix + head, part[brace + 1:part.rindex("}")])
            else:
                segs = part.split(" as ")[0].split("::")
                segs = [p for p in segs if p]
                if segs == ["self"]:
                    paths.append(prefix)
                elif segs and segs[-1] == "*":
                    paths.append(prefix + segs[:-1])
                else:
                    paths.append(prefix + segs)

    walk([], tree)
    return paths


class Crate:
    def __init__(self, name, src_dir, root_file):
        self.name = name
        self.src_dir = src_dir
        self.modules = {}  # tuple path -> source text (tests stripped)
        self.children = {}  # tuple path -> set of child names
        self.load((), root_file)

    def load(self, path, file):
        with open(file, encoding="utf-8") as f:
            raw = f.read()
        text = strip_test_code(strip_comments_and_literals(raw))
        # `#[path]` names a file in a string, which the stripped text no longer has.
        paths = dict((m.group(2), m.group(1)) for m in re.finditer(
            r'#\[path\s*=\s*"([^"]+)"\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;', raw))
        self.modules[path] = text
        self.children[path] = set()
        base = os.path.dirname(file)
        stem = os.path.splitext(os.path.basename(file))[0]
        if stem not in ("lib", "main", "mod") and path:
            base = os.path.join(base, stem)
        for m in re.finditer(r"(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", text):
            name = m.group(1)
            if name in paths:
                candidates = [os.path.join(os.path.dirname(file), paths[name])]
            else:
                candidates = [os.path.join(base, name + ".rs"), os.path.join(base, name, "mod.rs")]
            child = next((c for c in candidates if os.path.exists(c)), None)
            if child is None:
                continue
            self.children[path].add(name)
            self.load(path + (name,), child)

    def resolve(self, here, segs):
        """The deepest module a path starting in module `here` names, or None if external."""
        if not segs:
            return None
        first = segs[0]
        if first == "crate":
            at, rest = (), segs[1:]
        elif first in ("super", "self"):
            at, rest = here, segs
            while rest and rest[0] in ("super", "self"):
                if rest[0] == "super":
                    at = at[:-1]
                rest = rest[1:]
        elif first in self.children.get(here, ()):
            at, rest = here, segs
        else:
            return None
        for seg in rest:
            if seg in self.children.get(at, ()):
                at = at + (seg,)
            else:
                break
        return at

    def references(self, path):
        text = self.modules[path]
        found = []
        for m in re.finditer(r"\buse\s+([^;]+);", text):
            found.extend(expand_use_tree(m.group(1)))
        for m in re.finditer(r"\b((?:crate|super|self)(?:\s*::\s*\w+)+)", text):
            found.append(re.sub(r"\s+", "", m.group(1)).split("::"))
        return found

    def edges(self):
        """parent path -> {child: set of sibling children it uses}"""
        graph = {p: {c: set() for c in cs} for p, cs in self.children.items()}
        for path in self.modules:
            for segs in self.references(path):
                target = self.resolve(path, segs)
                if target is None:
                    continue
                k = 0
                while k < len(path) and k < len(target) and path[k] == target[k]:
                    k += 1
                if k < len(path) and k < len(target):
                    graph[path[:k]][path[k]].add(target[k])
        return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def workspace_crates():
    with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as f:
        manifest = f.read()
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", manifest).group(1)
    for member in re.findall(r'"([^"]+)"', members):
        src = os.path.join(ROOT, member, "src")
        # The library, else the main binary; other binaries with modules of their own too.
        for root in ("lib.rs", "main.rs"):
            if os.path.exists(os.path.join(src, root)):
                yield Crate(member, src, os.path.join(src, root))
                break
        bins = os.path.join(src, "bin")
        for file in sorted(os.listdir(bins)) if os.path.isdir(bins) else []:
            crate = Crate(f"{member} (bin {file[:-3]})", src, os.path.join(bins, file))
            if len(crate.modules) > 1:
                yield crate


def main(argv):
    show_all = "--all" in argv
    dot = "--dot" in argv
    wanted = [a for a in argv if not a.startswith("--")]
    failed = False
    if dot:
        print("digraph modules {")
    for crate in workspace_crates():
        if wanted and crate.name not in wanted:
            continue
        graph = crate.edges()
        if not dot:
            print(f"{crate.name}:")
        for parent in sorted(graph):
            if parent and not show_all:
                continue
            prefix = "::".join(parent)
            for child in sorted(graph[parent]):
                name = f"{prefix}::{child}" if prefix else child
                uses = sorted(graph[parent][child])
                if dot:
                    for used in uses:
                        target = f"{prefix}::{used}" if prefix else used
                        print(f'  "{crate.name}::{name}" -> "{crate.name}::{target}";')
                else:
                    print(f"  {name} -> {', '.join(uses) if uses else '(nothing)'}")
        for parent in sorted(graph):
            for scc in cycles(graph[parent]):
                failed = True
                prefix = "::".join((crate.name,) + parent)
                print(f"CYCLE in {prefix}: {' <-> '.join(scc)}", file=sys.stderr)
    if dot:
        print("}")
    if failed:
        print("module-graph: cycles found", file=sys.stderr)
        return 1
    print("module-graph: no cycles", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
