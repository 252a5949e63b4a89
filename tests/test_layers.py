"""The package's modules form layers that only point down, with no import cycles.

Pure Python: every m6jax/**/*.py is parsed with `ast`; module-level AND function-local
imports of m6jax modules count (a function-local import is how a cycle hides).
`from m6jax.x import y` counts as an import of `m6jax.x.y` when that is a module, else of
`m6jax.x`; importing a package runs its `__init__`, so `m6jax.data` is its own node.

LAYERS, lowest first. A module may import its own layer and the layers below; its
layer is that of its longest matching prefix in LAYERS (so `m6jax.train.loop` sits
above the rest of `m6jax.train`, `m6jax.vq.model` below the rest of `m6jax.vq`).

  base       errors, schema, sharding, pipeline, distributed, flops, kernels (the
             per-backend kernel table), checkpoint (+ its
             checkpoint_files, preemption), offload_layout: the
             config schema (every field's default), parallelism, storage and
             arithmetic that know nothing of M6's modules. `pipeline` is the SPMD
             schedule the model's scanned stack runs under (model/block imports it);
             `checkpoint` is the Orbax store (the VQ tokenizer's loader uses it too);
             `offload_layout` is the stored layout (`Segments`) the model's stack reads.
  model      model/* (M6, its blocks, stack, scan, remat table, MoE) and vq/model;
             model/build builds M6 from a run config.
  data       data/* (sources, tokenizer, packing, the pipeline), and what makes the
             text-to-image examples: vq/data, vq/load (a trained tokenizer encodes the
             images), vq/checks, t2i/vocab, t2i/data, t2i/images. Data may use a
             (trained) model, never training code.
  inference  generate, decoding/{cache,beam,sampling}, t2i/decode: decoders over a
             model's params; training's evaluation decodes, so they sit below train.
  train      train/* but the loop, and the training machinery it is built of:
             pseudo_to_real (the stage optimizers), offload, streamed_update,
             config_checks (refuses a training config), vq/train (the tokenizer's
             training), t2i/evaluate (the t2i metrics the loop logs).
  plan       plan, aot: the dry-run planner and its compiled check, from the same
             builders as training (train.stages), over abstract shapes.
  apps       finetune/*, embed/* (embeddings and their index), decoding/run (sampling from a checkpoint), t2i/cli, cli: users
             of trained checkpoints and the entry points' helpers; they build models
             with model/build, not with the pretraining loop.
  loop       train/loop: the pretraining run itself; only experiments/ call it.

experiments/, benchmarks/, notebooks/ may import anything (not checked here).

KNOWN_UPWARD lists the upward imports still there, each with its reason; their edges
are left out of the cycle check too (offload -> plan closes config_checks -> offload ->
plan -> config_checks until offload.check moves up), and an entry that is fixed fails
the test until it is removed. No private name (`_x`) is imported from another module.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "m6jax"

LAYERS = [
    ("base", ["m6jax", "m6jax.errors", "m6jax.schema", "m6jax.sharding", "m6jax.pipeline",
              "m6jax.distributed", "m6jax.flops", "m6jax.checkpoint", "m6jax.checkpoint_files",
              "m6jax.preemption", "m6jax.offload_layout", "m6jax.kernels"]),
    ("model", ["m6jax.model", "m6jax.vq.model"]),
    ("data", ["m6jax.data", "m6jax.vq", "m6jax.vq.data", "m6jax.vq.load", "m6jax.vq.checks",
              "m6jax.t2i", "m6jax.t2i.vocab", "m6jax.t2i.data", "m6jax.t2i.images"]),
    ("inference", ["m6jax.generate", "m6jax.decoding", "m6jax.t2i.decode"]),
    ("train", ["m6jax.train", "m6jax.pseudo_to_real", "m6jax.offload",
               "m6jax.streamed_update", "m6jax.config_checks", "m6jax.vq.train",
               "m6jax.t2i.evaluate"]),
    ("plan", ["m6jax.plan", "m6jax.plan_memory", "m6jax.plan_parallel", "m6jax.aot"]),
    ("apps", ["m6jax.finetune", "m6jax.embed", "m6jax.decoding.run", "m6jax.t2i.cli",
              "m6jax.cli"]),
    ("loop", ["m6jax.train.loop"]),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}

# Known upward imports, each with the reason it is still here. A fixed one must leave
# this table (the test says so), and nothing may be added to it without a reason.
KNOWN_UPWARD: dict = {}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def _owner(name: str) -> str | None:
    """The m6jax module `name` lives in (itself if a module, else its longest prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports() -> dict[str, dict[str, list[str]]]:
    """{module: {imported module: ["line N (module level|in a function)", ...]}}."""
    out: dict[str, dict[str, list[str]]] = {}
    for mod, path in MODULES.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        local = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                local.update(id(n) for n in ast.walk(fn) if n is not fn)
        edges: dict[str, list[str]] = {}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                           for a in node.names]
            for t in targets:
                if t != "m6jax" and not t.startswith("m6jax."):
                    continue
                owner = _owner(t)
                if owner is None or owner == mod:
                    continue
                where = "in a function" if id(node) in local else "module level"
                edges.setdefault(owner, []).append(f"line {node.lineno} ({where})")
        out[mod] = edges
    return out


def layer_of(mod: str) -> str:
    """The layer of `mod`'s longest matching prefix ("m6jax" matches only the package's
    __init__, so a new module in no layer fails test_every_module_is_in_a_layer)."""
    best, layer = -1, None
    for name, prefixes in LAYERS:
        for p in prefixes:
            inside = mod == p or (p != "m6jax" and mod.startswith(p + "."))
            if inside and len(p) > best:
                best, layer = len(p), name
    assert layer is not None, f"{mod} is in no layer: add it to LAYERS"
    return layer


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward(graph) -> dict[tuple[str, str], list[str]]:
    out = {}
    for mod, edges in graph.items():
        for dep, where in edges.items():
            if RANK[layer_of(dep)] > RANK[layer_of(mod)]:
                out[(mod, dep)] = where
    return out


def test_every_module_is_in_a_layer():
    for mod in MODULES:
        layer_of(mod)


def test_no_import_cycles():
    graph = imports()
    for a, b in KNOWN_UPWARD:  # reported (and bounded) by test_imports_only_point_down
        graph[a].pop(b, None)
    found = cycles(graph)
    lines = []
    for comp in found:
        members = set(comp)
        for m in comp:
            for dep, where in graph[m].items():
                if dep in members:
                    lines.append(f"  {m} -> {dep} ({', '.join(where)})")
    assert not found, ("import cycles among m6jax modules:\n" + "\n".join(
        f"cycle {i + 1}: {' / '.join(c)}" for i, c in enumerate(found)) + "\n" + "\n".join(lines))


def test_imports_only_point_down():
    found = upward(imports())
    new = {k: v for k, v in found.items() if k not in KNOWN_UPWARD}
    assert not new, "imports from a lower layer up to a higher one:\n" + "\n".join(
        f"  {a} ({layer_of(a)}) -> {b} ({layer_of(b)}): {', '.join(w)}"
        for (a, b), w in sorted(new.items()))
    fixed = set(KNOWN_UPWARD) - set(found)
    assert not fixed, f"fixed, remove from KNOWN_UPWARD: {sorted(fixed)}"


def test_no_private_names_imported_across_modules():
    """`from m6jax.x import _y` reaches into another module's internals (plan.py once
    built its TrainState with train.state's private `_init_fn`): make it public."""
    found = []
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("m6jax"):
                found += [f"  {mod} line {node.lineno}: from {node.module} import {a.name}"
                          for a in node.names if a.name.startswith("_")
                          and not a.name.startswith("__")]
    assert not found, "private names imported from another module:\n" + "\n".join(found)
