r"""Per-op account of one train step on CPU: which fusions and dots take the time.

  python benchmarks/cpu_profile.py --model=bench --json=/tmp/prof_bench.json
  python benchmarks/cpu_profile.py --model=tiny      # experiments/configs/m6.py:tiny
  python benchmarks/cpu_profile.py --model=moe_tiny  # experiments/configs/m6_moe.py:tiny
  python benchmarks/cpu_profile.py --model=moe_tiny --moe_dispatch=gather   # another dispatch

Runs the real train step (`make_train_step`) of the chosen model under `jax.profiler`
for --steps steps, reads the per-thunk events of XLA:CPU's trace and joins them with the
compiled HLO: each op's time per step, its FLOPs (dots, from their shapes) and the bytes
it must move (operands read once, result written once). The floor of an op is
max(FLOPs / matmul peak, bytes / copy bandwidth), both measured in this process (a
2048^3 matmul; a 64M-float scaled copy). `bench` is benchmarks/train_step.py's model
(width 512, 4 layers, sequence 256, batch 8, vocab 8192). One CPU device.
"""
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py)

flags.DEFINE_enum("model", "bench", ["bench", "tiny", "moe_tiny"], "which model's step")
flags.DEFINE_string("moe_dispatch", "", "moe_tiny: model.moe.dispatch instead of the config's")
flags.DEFINE_integer("steps", 3, "profiled steps (after 2 warm-up steps)")
flags.DEFINE_integer("top", 25, "ops listed")
flags.DEFINE_string("json", "", "write the table here")
FLAGS = flags.FLAGS

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1,
                "u8": 1, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|pred|s8|u8|s64|u64|f64)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) (\w[\w\-]*)\((.*)$")


def _shapes(type_text):
    return [(t, [int(d) for d in dims.split(",") if d]) for t, dims in _SHAPE.findall(type_text)]


def _bytes(type_text):
    total = 0
    for t, dims in _shapes(type_text):
        n = 1
        for d in dims:
            n *= d
        total += n * _DTYPE_BYTES[t]
    return total


def parse_hlo(text):
    """{computation: {instr: (type_text, opcode, rest)}} from compiled HLO text."""
    comps, cur = {}, None
    for line in text.splitlines():
        if line.startswith(("%", "ENTRY %")) and line.rstrip().endswith("{"):
            cur = line.split("%", 1)[1].split(" ", 1)[0]
            comps[cur] = {}
        elif cur is not None and (m := _INSTR.match(line)):
            comps[cur][m.group(1)] = (m.group(2), m.group(3), m.group(4))
    return comps


def _dot_flops(instrs, type_text, rest):
    out = _shapes(type_text)[0][1]
    operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
    lhs = _shapes(instrs[operands[0]][0])[0][1]
    contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
    k = 1
    for d in (contract.group(1).split(",") if contract and contract.group(1) else []):
        k *= lhs[int(d)]
    n = 1
    for d in out:
        n *= d
    return 2.0 * n * k


def _fusion_reads(body, operand_types):
    """Bytes a fusion reads: a parameter used only through dynamic-slices (a scan
    reading one layer of a stacked array) counts as the slices it takes."""
    params = {n: int(re.search(r"parameter\((\d+)\)", "parameter(" + r).group(1))
              for n, (t, op, r) in body.items() if op == "parameter"}
    total = 0
    for pname, idx in params.items():
        users = [(t, op) for t, op, r in body.values()
                 if re.search(rf"%{re.escape(pname)}\b", r.split("),", 1)[0])]
        if users and all(op == "dynamic-slice" for _, op in users):
            total += sum(_bytes(t) for t, _ in users)
        elif idx < len(operand_types):
            total += _bytes(operand_types[idx])
    return total


def op_costs(comps):
    """{instr name: (kind, flops, bytes, result type)} for the instructions that run as
    thunks (control flow such as while/call is left out: its body's ops are listed)."""
    costs = {}
    for instrs in comps.values():
        for name, (type_text, opcode, rest) in instrs.items():
            if opcode in ("while", "call", "conditional", "parameter", "tuple",
                          "get-tuple-element", "bitcast", "constant"):
                continue
            operands = re.findall(r"%([\w.\-]+)", rest.split("),", 1)[0])
            operand_types = [instrs[o][0] for o in operands if o in instrs]
            reads = sum(_bytes(t) for t in operand_types)
            flops, kind = 0.0, opcode
            if opcode == "dot":
                flops = _dot_flops(instrs, type_text, rest)
            elif opcode == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", rest).group(1)
                kind = re.search(r"kind=(\w+)", rest).group(1)
                body = comps.get(called, {})
                reads = _fusion_reads(body, operand_types)
                for t2, op2, r2 in body.values():
                    if op2 == "dot":
                        flops += _dot_flops(body, t2, r2)
                if flops:
                    kind += "(dot)"
            elif opcode == "dynamic-slice":
                reads = _bytes(type_text)
            what = re.search(r'op_name="([^"]*)"', rest)
            what = what.group(1) if what else ""
            for noise in ("jit(train_step)/", "stack/while/body/closed_call/"):
                what = what.replace(noise, "")
            costs[name] = (kind, flops, _bytes(type_text) + reads, type_text.split("{")[0][:60],
                           what[:90])
    return costs


def _build(model_name):
    import numpy as np

    from configs import m6 as m6_config
    from configs import m6_moe
    from m6jax import flops, sharding
    from m6jax.model import M6
    from m6jax.train import optim
    from m6jax.train.state import create_train_state, dummy_batch
    from m6jax.train.step import make_train_step

    if model_name == "bench":
        c = m6_config.get_config("tiny")
        c.model.update(emb_dim=512, num_heads=8, mlp_dim=2048, num_layers=4)
        c.data.vocab_size = 8192
        c.data.text_len, grid, patch_dim, b = 240, 4, 4, 8
    else:
        c = (m6_config if model_name == "tiny" else m6_moe).get_config("tiny")
        if model_name == "moe_tiny" and FLAGS.moe_dispatch:
            c.model.moe.dispatch = FLAGS.moe_dispatch
        grid = c.data.image_size // c.data.patch_size
        patch_dim = c.data.patch_size ** 2 * c.data.image_channels
        b = c.batch_size
    t = c.data.text_len
    mesh = sharding.make_mesh(c.mesh)
    model = M6(c.model, grid, t)
    tx = optim.make_optimizer(c.optimizer, 1000)
    state, sh = create_train_state(model, tx, dummy_batch(b, grid * grid, patch_dim, t), mesh, 0)
    step = make_train_step(model, tx, mesh, sh, num_tasks=4)
    rng = np.random.default_rng(0)
    pos = np.arange(t)[None].repeat(b, 0)
    v = int(c.data.vocab_size)
    batch = sharding.global_batch(mesh, dict(
        patches=rng.random((b, grid * grid, patch_dim), np.float32),
        image_mask=np.ones((b, grid * grid), bool),
        text_tokens=rng.integers(4, v, (b, t)).astype(np.int32),
        text_mask=np.ones((b, t), bool), text_is_prefix=pos < 8,
        targets=rng.integers(4, v, (b, t)).astype(np.int32),
        loss_mask=(pos >= 7).astype(np.float32), task_id=np.zeros((b,), np.int32)))
    step_flops = flops.train_flops_per_sequence(c.model, grid * grid, patch_dim, t) * b
    return mesh, step, state, batch, step_flops


def measure_bandwidth(n: int = 1 << 24) -> float:
    """Bytes/s of a jitted in-place scaled copy of n float32 (reads and writes n * 4
    bytes; the input buffer is donated, so no fresh pages are touched)."""
    import jax
    import jax.numpy as jnp
    f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x = f(jnp.ones((n,), jnp.float32))
    x.block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        x = f(x)
        x.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 8.0 * n / best


def main(_):
    import jax

    from m6jax import flops

    mesh, step, state, batch, step_flops = _build(FLAGS.model)
    with jax.set_mesh(mesh):
        hlo = step.lower(state, batch).compile().as_text()
        costs = op_costs(parse_hlo(hlo))
        for _ in range(2):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        step_ms = 1000 * (time.perf_counter() - t0) / FLAGS.steps
        trace_dir = tempfile.mkdtemp(prefix="m6jax_prof_")
        jax.profiler.start_trace(trace_dir)
        for _ in range(FLAGS.steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        jax.profiler.stop_trace()
    peak = flops.measure_peak_flops(2048)
    bandwidth = measure_bandwidth()

    trace = json.load(gzip.open(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz")[-1]))
    per_op = collections.Counter()
    calls = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e["name"] in costs:
            per_op[e["name"]] += e["dur"] / 1e3 / FLAGS.steps
            calls[e["name"]] += 1
    total = sum(per_op.values())
    rows = []
    for name, ms in per_op.most_common():
        kind, fl, moved, shape, what = costs[name]
        n = calls[name] / FLAGS.steps
        floor = 1000 * n * max(fl / peak, moved / bandwidth)
        rows.append(dict(op=name, what=what, kind=kind, shape=shape, calls_per_step=n,
                         ms_per_step=round(ms, 2), share=round(ms / total, 4),
                         gflop_per_step=round(n * fl / 1e9, 3),
                         mb_per_step=round(n * moved / 1e6, 1),
                         floor_ms=round(floor, 2), over_floor=round(ms / max(floor, 1e-3), 1)))
    groups = collections.Counter()
    for r in rows:
        groups["dots" if r["gflop_per_step"] else "elementwise/copies"] += r["ms_per_step"]
    result = dict(model=FLAGS.model, step_ms=round(step_ms, 1), op_ms_sum=round(total, 1),
                  step_gflop=round(step_flops / 1e9, 2), peak_gflops=round(peak / 1e9, 1),
                  bandwidth_gbs=round(bandwidth / 1e9, 1),
                  floor_ms_sum=round(sum(r["floor_ms"] for r in rows), 1),
                  mfu=step_flops / (step_ms / 1000) / peak,
                  groups={k: round(v, 1) for k, v in groups.items()}, ops=rows)
    print(f"{FLAGS.model}: step {step_ms:.0f} ms, ops sum {total:.0f} ms, floor "
          f"{result['floor_ms_sum']:.0f} ms, MFU {result['mfu']:.1%} (peak {peak / 1e9:.0f} "
          f"GFLOP/s, copy {bandwidth / 1e9:.1f} GB/s); {result['groups']}")
    print("| op | what (HLO op_name) | kind | result | ms/step | share | GFLOP | MB | floor ms "
          "| x floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows[:FLAGS.top]:
        print(f"| {r['op']} | {r['what']} | {r['kind']} | {r['shape']} | {r['ms_per_step']} | "
              f"{100 * r['share']:.1f}% | {r['gflop_per_step']} | {r['mb_per_step']} | "
              f"{r['floor_ms']} | {r['over_floor']} |")
    if FLAGS.json:
        report.write_json(FLAGS.json, result, indent=1)
        with open(FLAGS.json.rsplit(".", 1)[0] + ".hlo.txt", "w", encoding="utf-8") as f:
            f.write(hlo)


if __name__ == "__main__":
    app.run(main)
