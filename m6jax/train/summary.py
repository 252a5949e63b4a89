"""summary.json of a pretraining run: assembled from the evaluators' entries, the timers
and the run's facts; written as strict JSON and printed as the lines a user reads."""
from __future__ import annotations

import json
import os

import numpy as np

from m6jax import pipeline
from m6jax import pseudo_to_real as p2r
from m6jax.train import moe_metrics


def assemble(config, results: dict, initial_eval: dict, chrono, cost, final_metrics,
             last_logged, **facts) -> tuple[dict, list[str]]:
    """(summary, caption examples to print).

    `results`: {evaluator name: entries} (`evaluators.run_all`); the pretraining one
    gives the eval losses and caption accuracy, the others' entries come last.
    `cost`: the step's tokens, FLOPs and the peak (`loop.StepCost`). `final_metrics`: the
    last step's fetched metrics, or None when no step ran here; then `last_logged(key)`
    reads metrics.jsonl. `facts`: num_params, num_devices, mesh, stage.
    """
    final = dict(results["pretraining"])
    examples = final.pop("examples")
    step_s = chrono.mean_step_s()
    summary = dict(
        total_steps=config.total_steps,
        final_train_loss=(float(final_metrics["loss"]) if final_metrics is not None
                          else last_logged("loss")),
        eval_loss=final["eval_loss"], initial_eval_loss=initial_eval["eval_loss"],
        **{k: v for k, v in final.items() if k.startswith("eval_loss/")},
        **{k.replace("eval_loss", "initial_eval_loss"): v for k, v in initial_eval.items()
           if k != "eval_loss"},
        **{k: v for k, v in final.items() if k.startswith("caption_")},
        tokens_per_s=cost.tokens / step_s, step_ms=1000 * step_s,
        mfu=cost.flops / step_s / cost.peak, peak_flops=cost.peak,
        peak_flops_source=cost.peak_source,
        num_params=facts["num_params"], num_devices=facts["num_devices"], mesh=facts["mesh"],
        stage=facts["stage"], pseudo_to_real_switch_step=p2r.switch_step(config),
        train_s=chrono.train_s(), pipeline_bubble=pipeline.from_config(config).bubble,
        wall_s=chrono.wall_s(), **moe_metrics.summary(final_metrics, last_logged))
    for name, entries in results.items():
        if name != "pretraining":
            summary.update(entries)
    return summary, examples


def final_scalars(summary) -> dict:
    """The eval.jsonl / TensorBoard row of the final evaluation."""
    return {k: summary[k] for k in ("eval_loss", "caption_accuracy") if summary[k] is not None}


def write_and_print(summary, examples, workdir) -> None:
    """summary.json (strict JSON), then the captions and the one-line result a user reads."""
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(strict_json(summary), f, indent=2, ensure_ascii=False, allow_nan=False)
    labelled = summary["caption_accuracy"] is not None
    print("\nGenerated captions (held-out digits):" if labelled else
          "\nGenerated captions (held-out records, reference -> generated):")
    for line in examples:
        print("  " + line)
    accuracy = (f"caption accuracy {summary['caption_accuracy']:.1%}" if labelled else
                "caption accuracy n/a (no digit labels; caption overlap F1 "
                f"{summary['caption_overlap_f1']:.2f})")
    print(f"\n{accuracy} | eval loss "
          f"{summary['initial_eval_loss']:.3f} -> {summary['eval_loss']:.3f} | "
          f"{summary['tokens_per_s']:,.0f} tok/s | mfu {summary['mfu']:.1%} | "
          f"wall {summary['wall_s']:.0f} s | {os.path.join(workdir, 'summary.json')}",
          flush=True)


def exists(workdir) -> bool:
    return os.path.exists(os.path.join(workdir, "summary.json"))


def already_complete(workdir, step, main, run_ckpt) -> dict:
    """A rerun of a finished run: nothing to train, and the first run's measured figures
    (throughput, wall time) stay in summary.json rather than being overwritten."""
    run_ckpt.close()
    path = os.path.join(workdir, "summary.json")
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    if main:
        print(f"run already complete at step {step}: {path} kept; use another --workdir "
              "or a larger --config.total_steps to train further", flush=True)
    return summary


def strict_json(tree):
    """NaN/inf -> None (JSON null): summary.json stays strict JSON."""
    if isinstance(tree, dict):
        return {k: strict_json(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [strict_json(v) for v in tree]
    if isinstance(tree, float) and not np.isfinite(tree):
        return None
    return tree
