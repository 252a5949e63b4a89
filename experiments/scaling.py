r"""A small scaling study: dense M6 and M6-MoE at several sizes, same data and token
budget, final held-out loss against parameters and against training FLOPs.

  python experiments/scaling.py --workdir=runs/scaling                 # ~20 min here
  python experiments/scaling.py --workdir=/tmp/s --steps=40 --sizes=s,m  # a smoke run

Every run is `m6.py:tiny` (dense) or the same with `m6_moe.py`'s tiny MoE section (8
Switch top-1 experts every 2nd layer) at the width/depth of SIZES, trained for --steps
steps of the same batches (same seed, batch size and sequence length: the same tokens)
into DIR/<family>_<size>/. Writes DIR/scaling.csv, DIR/scaling.png (loss vs total
parameters and vs training FLOPs, log-log, with a fitted power law per family) and
DIR/scaling.md (the table and the fits). With three or four points per family the
fitted exponents are a description of these runs, not a scaling law.
"""
import csv
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments", "configs"))

from absl import app, flags, logging  # noqa: E402

# name -> (emb_dim, num_heads, mlp_dim, num_layers); ours, spanning ~10x in parameters.
SIZES = {"xs": (32, 2, 128, 2), "s": (64, 4, 256, 2), "m": (96, 4, 384, 4),
         "l": (128, 4, 512, 4)}
FAMILIES = ("dense", "moe")
COLUMNS = ["family", "size", "emb_dim", "num_layers", "num_experts", "total_params",
           "activated_params", "tokens", "train_flops", "eval_loss", "final_train_loss",
           "step_ms", "wall_s"]

flags.DEFINE_string("workdir", None, "output directory")
flags.DEFINE_integer("steps", 300, "training steps per run (the token budget)")
flags.DEFINE_list("sizes", list(SIZES), f"sizes to run, from {', '.join(SIZES)}")
flags.DEFINE_list("families", list(FAMILIES), "dense and/or moe")
flags.DEFINE_bool("replot", False, "Only redraw scaling.png/.md from DIR/scaling.csv (e.g. "
                  "after an interrupted sweep: the csv is rewritten after every run).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def run_config(family: str, size: str, steps: int):
    import m6
    import m6_moe
    d, h, f, layers = SIZES[size]
    c = m6.get_config("tiny")
    c.model.update(emb_dim=d, num_heads=h, mlp_dim=f, num_layers=layers)
    if family == "moe":
        c.model.moe = m6_moe.moe_section()  # m6_moe.py:tiny's experts
    c.total_steps = steps
    c.log_every = max(1, steps // 10)
    c.eval_every = 10 * steps  # only the final eval
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps // 4)
    c.num_caption_samples = 0
    return c


def fit_power_law(x, y):
    """loss = a * x**(-b) by least squares in log-log; returns (a, b)."""
    import numpy as np
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(intercept)), float(-slope)


def main(argv):
    del argv
    from m6jax import plan
    from m6jax.train.loop import train
    for name, allowed in (("sizes", SIZES), ("families", FAMILIES)):
        bad = [v for v in getattr(FLAGS, name) if v not in allowed]
        if bad:
            sys.exit(f"flag error: --{name} has {bad}; use values from {', '.join(allowed)}")
    os.makedirs(FLAGS.workdir, exist_ok=True)
    if FLAGS.replot:
        _plot(_read())
        return
    rows = []
    for family in FLAGS.families:
        for size in FLAGS.sizes:
            c = run_config(family, size, FLAGS.steps)
            p = plan.plan(c, (1, 1, 1, 1))
            p_, _, t = plan.sequence_shape(c)
            tokens = FLAGS.steps * c.batch_size * (p_ + t)
            logging.info("scaling: %s %s, %s parameters", family, size, f"{p['total_params']:,}")
            s = train(c, os.path.join(FLAGS.workdir, f"{family}_{size}"))
            rows.append(dict(
                family=family, size=size, emb_dim=c.model.emb_dim,
                num_layers=c.model.num_layers,
                num_experts=int(c.model.moe.num_experts) if family == "moe" else 0,
                total_params=p["total_params"], activated_params=p["activated_params"],
                tokens=tokens, train_flops=p["flops_per_token"] * tokens,
                eval_loss=s["eval_loss"], final_train_loss=s["final_train_loss"],
                step_ms=s["step_ms"], wall_s=s["wall_s"]))
            _write(rows)
    _plot(rows)


def _write(rows):
    with open(os.path.join(FLAGS.workdir, "scaling.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _read():
    with open(os.path.join(FLAGS.workdir, "scaling.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in COLUMNS[2:]:
            r[k] = float(r[k]) if k in ("train_flops", "eval_loss", "final_train_loss",
                                        "step_ms", "wall_s") else int(r[k])
    return rows


def _plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = ["| family | fit vs parameters | fit vs training FLOPs |", "|---|---|---|"]
    for family, color in zip(FAMILIES, ("tab:blue", "tab:orange")):
        fam = [r for r in rows if r["family"] == family]
        if not fam:
            continue
        y = np.array([r["eval_loss"] for r in fam])
        fits = []
        for ax, key, label in ((axes[0], "total_params", "N"), (axes[1], "train_flops", "C")):
            x = np.array([r[key] for r in fam], float)
            ax.scatter(x, y, color=color, label=family)
            if len(fam) >= 2:
                a, b = fit_power_law(x, y)
                xs = np.geomspace(x.min(), x.max(), 50)
                ax.plot(xs, a * xs ** -b, color=color, ls="--",
                        label=f"{family}: {a:.3g} {label}^-{b:.3f}")
                fits.append(f"loss = {a:.4g} * {label}^-{b:.4f}")
            else:
                fits.append("(one point)")
        lines.append(f"| {family} | {fits[0]} | {fits[1]} |")
    for ax, xl in zip(axes, ("total parameters", "training FLOPs (activated)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("final held-out loss")
        ax.legend(fontsize=8)
    fig.suptitle(f"M6 dense vs MoE: {rows[0]['tokens']:,} training tokens per run")
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.workdir, "scaling.png"), dpi=120)
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        table.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])
                                       for k in COLUMNS) + " |")
    with open(os.path.join(FLAGS.workdir, "scaling.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(table + [""] + lines) + "\n")
    print("\n".join(table + [""] + lines))


if __name__ == "__main__":
    app.run(main)
