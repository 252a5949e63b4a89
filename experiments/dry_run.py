r"""Dry run: what a config needs per device on its intended grid, before paying for it.

  python experiments/dry_run.py --config=experiments/configs/m6_10b.py
  python experiments/dry_run.py --config=experiments/configs/m6_t_1t.py --json
  python experiments/dry_run.py --config=experiments/configs/m6_10b.py --aot
  python experiments/dry_run.py --config=experiments/configs/m6_t2i.py:long --lower=tpu \
      --hlo_out=/tmp/long_tpu.mlir

From abstract shapes and the rules table (no allocation, no devices): total and
activated-per-token parameters, train FLOPs per token, and the in-step device peak per
device: resident parameters, gradients and optimizer state, the streamed (offloaded)
units in flight, and an activation estimate; the host memory per device and per node;
host<->device bytes per step and their time against the step's compute time (from the
`hardware` section's link speed and peak TFLOP/s). `fits`: the peak fits
`hardware.device_memory_gb` and a node's host bytes fit `host_memory_gb_per_node`.
For an MoE config, `moe.capacity_per_expert` (slots per expert and routing group) and
`moe.uniform_drop_fraction` (the share of choices dropped under perfectly uniform
routing), with a warning when the capacity is below 4. `--aot` also compiles the real train step ahead of
time for the same mesh shape on fake CPU devices, with the depth cut to `--aot_units`
scanned units, and prints XLA's memory analysis beside the analytic figures for that
reduced model (compilation allocates nothing; it takes a minute or more on 2 cores).
`--lower=cuda|tpu` lowers that reduced train step for a platform this machine need not
have, with that platform's kernels (m6jax/kernels.py), writes its StableHLO text to
`--hlo_out` and prints one line: the kernels (custom calls) it contains and its largest
buffers (docs/kernels.md).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (path.py:variant); paper-scale files default to `paper`.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_AOT = flags.DEFINE_bool("aot", False, "Also compile a reduced-depth train step ahead of "
                         "time on fake CPU devices and report XLA's memory analysis.")
_AOT_UNITS = flags.DEFINE_integer("aot_units", 2, "Scanned units (layers, or MoE groups of "
                                  "`every` layers) of the --aot model.")
_LOWER = flags.DEFINE_enum("lower", None, ["cuda", "tpu"], "Also lower the reduced-depth "
                           "train step for this platform and summarise its kernels.")
_HLO_OUT = flags.DEFINE_string("hlo_out", None, "--lower: write the StableHLO text here.")
flags.mark_flags_as_required(["config"])


def _num_devices(config) -> int:
    hw = config.get("hardware")
    if hw is None:
        sys.exit("config error: the config has no `hardware` section (num_devices, "
                 "device_kind, device_memory_gb); see experiments/configs/paper_scale.py")
    return int(hw.num_devices)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    n = _num_devices(config)
    if _AOT.value or _LOWER.value:  # fake the planned device count; must precede importing jax
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={n}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from m6jax import plan
    try:
        result = plan.plan(config)
    except ValueError as e:
        sys.exit(f"config error: {e}")
    if _AOT.value:
        from m6jax import aot
        result["aot"] = aot.compare(config, _AOT_UNITS.value)
    if _LOWER.value:
        result["lower"] = _lower(config, _LOWER.value)
    if result.get("moe", {}).get("warning"):
        print(f"warning: {result['moe']['warning']}", file=sys.stderr)
    if _JSON.value:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result))


def _lower(config, platform: str) -> dict:
    """Lowers the reduced train step for `platform`, writes --hlo_out, prints the line."""
    from m6jax import aot
    from m6jax.plan_memory import sequence_shape
    text = aot.lower_for(config, platform, _AOT_UNITS.value)
    if _HLO_OUT.value:
        with open(_HLO_OUT.value, "w") as f:
            f.write(text)
    p, _, t = sequence_shape(config)
    summary = aot.summarize(text)
    print(aot.summary_line(platform, summary, p + t), file=sys.stderr)
    return dict(platform=platform, custom_calls=summary["custom_calls"],
                largest=summary["largest"], sequence=p + t,
                square_buffers=[list(s) for s in aot.square_buffers(summary, p + t)])


def _overflow(r):
    from m6jax import plan
    return plan.overflow(r)


def _gib(x: float) -> str:
    return f"{x / 2**30:8.2f} GiB"


def _table(r) -> str:
    pd = r["per_device_bytes"]
    lines = [
        f"config         {r['variant']}  (remat {r['remat_policy']})",
        f"parameters     {r['total_params']:,} total, {r['activated_params']:,} per token",
        f"train FLOPs    {r['flops_per_token'] / 1e9:,.2f} GFLOP per token",
        f"grid           {r['num_devices']} x {r['device_kind']} "
        f"({r['device_memory_gb']} GiB each), mesh {r['mesh']}",
        f"optimizer      {r['optimizer']}, master weights {r['param_dtype']}",
        "per device (in-step peak; offloaded units: those in flight):",
        *(f"  {k:<12} {_gib(pd[k])}" for k in ("params", "gradients", "optimizer",
                                                "activations")),
        f"  {'device peak':<12} {_gib(pd['device_peak'])}",
        f"  {'host':<12} {_gib(pd['host'])}"
        + (f"   ({_gib(r['per_node_host_bytes']).strip()} per node of "
           f"{r['host_memory_gb_per_node']} GiB)" if r["per_node_host_bytes"] else ""),
    ]
    pp = r.get("pipeline")
    if pp:
        lines.append(f"pipeline       {pp['stages']} stages x {pp['repeats']} repeats, "
                     f"{pp['microbatches']} microbatches, bubble {pp['bubble']:.1%}; per stage "
                     f"{pp['layers_per_stage']} layers, {_gib(pp['stack_params_bytes_per_stage']).strip()}"
                     f" of stack params; {_gib(pp['microbatch_activations_in_flight_bytes']).strip()}"
                     " of microbatch activations in flight per device")
    if r["transfer_s_per_step"] is not None and r["compute_s_per_step"] is not None:
        hide = r["transfer_s_per_step"] <= r["compute_s_per_step"]
        lines.append(f"per step       {r['transfer_bytes_per_step'] / 2**30:,.1f} GiB host<->device: "
                     f"{r['transfer_s_per_step']:.2f} s vs {r['compute_s_per_step']:.2f} s of "
                     f"compute at peak ({'hidden behind compute' if hide else 'transfer-bound'})")
    if "moe" in r:
        m = r["moe"]
        cap = ("dropless" if m["capacity_per_expert"] is None else
               f"C={m['capacity_per_expert']} per expert and group")
        lines.append(f"moe routing    groups of {m['group_size']} tokens, {cap}, uniform "
                     f"drop {m['uniform_drop_fraction']:.2%} (priority {m['priority']})")
        if m["warning"]:
            lines.append(f"WARNING        {m['warning']}")
    lines.append(f"fits           {'yes' if r['fits'] else 'NO: ' + str(_overflow(r))}")
    if "aot" in r:
        a = r["aot"]
        lines += [f"ahead-of-time compile, {a['num_layers']} layers on the same mesh "
                  f"({a['compile_s']:.0f} s):",
                  f"  {'':<12} {'analytic':>12} {'XLA':>12}",
                  f"  {'state':<12} {_gib(a['analytic_state'])} {_gib(a['xla_arguments'])}",
                  f"  {'temporaries':<12} {_gib(a['analytic_temp'])} {_gib(a['xla_temp'])}"]
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
