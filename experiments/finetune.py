r"""M6 downstream fine-tuning from a pretraining checkpoint; writes WORKDIR/summary.json.

  python experiments/finetune.py --config=experiments/configs/finetune_sentiment.py \
      --config.init_from=/work/runs/pretrained_tiny --workdir=/work/runs/ft_sentiment

Tasks (one config each): finetune_sentiment.py (label-word classification of reviews +
TF-IDF baseline), finetune_retrieval.py (caption-likelihood retrieval on held-out
digits), finetune_caption.py (captioning from pretrained vs random init),
finetune_recall.py (two-tower contrastive text recall + TF-IDF). Any task:
--config.method=full|lora|prompt (prompt: sentiment and recall). The model
shape, data layout and tokenizer are the pretrained run's, read from init_from.
"""
import json
import os
import sys
import time

# Runnable as a script from a clone without installing: make `m6jax` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from m6jax import cli  # noqa: E402

_CONFIG = cli.define_config(
    "config", None, "experiments/configs/finetune_<task>.py; override with --config.field=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for summary.json and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        cli.refuse(f"flag error: unexpected arguments {argv[1:]}; flags are --name=value")
    t_start = time.time()
    workdir = cli.check_workdir(_WORKDIR.value)
    import jax  # imported after flag parsing, so XLA flags from the caller apply

    from m6jax import sharding
    from m6jax.config_checks import clamp_warmup, validate_config
    from m6jax.errors import InputError
    from m6jax.finetune import caption, pretrained, recall, retrieval, sentiment
    from m6jax.finetune.config import validate_finetune_config

    # ---- The pretrained run (checkpoint, config, tokenizer) and the run config.
    ft = _CONFIG.value
    try:  # refuse a bad config or init_from with one clear line, before compiling
        validate_finetune_config(ft)
        notice = clamp_warmup(ft)
        if notice:
            logging.info(notice)
        source = pretrained.resolve(ft.init_from)
        config = pretrained.run_config(ft, source)
        validate_config(config, jax.device_count())
    except ValueError as e:
        cli.refuse(f"config error: {e}")
    if cli.verbose():
        logging.info("fine-tune %s from %s; run config:\n%s", ft.task, source.step_dir, config)
    else:
        logging.info("fine-tune %s from %s (%s)", ft.task, source.step_dir, cli.config_line(sys.argv))
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)

    # ---- Fine-tune and evaluate.
    runner = {"sentiment": sentiment, "retrieval": retrieval, "caption": caption,
              "recall": recall}[ft.task]
    try:
        summary = runner.run(config, ft, source, mesh, workdir)
    except InputError as e:  # bad data, found while building batches (before compiling)
        cli.refuse(f"input error: {e}")
    summary.update(task=ft.task, init_from=source.step_dir, total_steps=config.total_steps,
                   batch_size=config.batch_size, num_devices=jax.device_count(),
                   mesh=dict(mesh.shape), wall_s=time.time() - t_start)

    # ---- Summary.
    if jax.process_index() == 0:
        path = os.path.join(workdir, "summary.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
        print(f"\nfine-tune {ft.task} from {source.step_dir}:")
        for k, v in summary.items():
            if k.startswith("examples_"):
                print(f"  {k}:\n" + "\n".join(f"    {line}" for line in v[:4]))
            elif isinstance(v, float):
                print(f"  {k:44s} {v:.4f}")
        print(f"wall {summary['wall_s']:.0f} s | {path}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
