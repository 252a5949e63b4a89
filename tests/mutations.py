"""Mutation checks: break a feature on purpose and see its tests go red.

  python tests/mutations.py              # every case (about 8 minutes on 2 cores)
  python tests/mutations.py no_groups    # one case

Each case replaces one exact snippet of the source (it must occur as often as the case
says), runs the tests that guard it in one process, restores the file and prints the
pytest summary. A case whose tests still pass is a test that cannot fail: exit status 1.
"""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# name: (file, snippet, replacement, occurrences, pytest arguments)
CASES = {
    "blocked_layout": ("m6jax/model/moe/grouped.py", 'side="right"', 'side="left"', 1,
                       ["tests/test_moe_grouped.py", "-k", "reference"]),
    "blocked_full_sets": ("m6jax/model/moe/grouped.py", "first=k < n_sized", "first=True", 1,
                          ["tests/test_moe_grouped.py", "-k", "reference"]),
    "blocked_small_blocks": ("m6jax/model/moe/grouped.py", "    sizes = {16, 32, 48, 64}\n",
                             "    sizes = {16}\n    top = 16\n", 1,
                             ["tests/test_moe_grouped.py", "-k", "one_block"]),
    "blocked_dropout_fused": ("m6jax/model/moe/layer.py",
                              "pure = self.deterministic or not self.dropout_rate",
                              "pure = True", 1, ["tests/test_moe_grouped.py", "-k", "dropout"]),
    "score_as_order": ("m6jax/model/moe/dispatch.py", 'priority == "score"',
                       'priority == "never"', 2, ["tests/test_moe_layer.py", "-k", "score"]),
    "no_groups": ("m6jax/model/moe/layer.py",
                  "    if group_size and (batch * length) % group_size == 0:", "    if False:", 1,
                  ["tests/test_moe_layer.py", "-k", "group"]),
    "ep_dropless_gspmd": ("m6jax/model/moe/parallel.py",
                          "    mesh = _expert_mesh()\n    if mesh is None:\n        def local(",
                          "    mesh = None\n    if mesh is None:\n        def local(", 1,
                          ["tests/test_moe_parallel.py", "-k", "blocked"]),
    "grouped_gspmd_sort": ("m6jax/model/moe/parallel.py",
                           "    if not batch:\n        return fn(*tokens, *weights)",
                           "    if True:\n        return fn(*tokens, *weights)", 1,
                           ["tests/test_moe_parallel.py", "-m", "", "-k", "sort_locally"]),
    "grouped_keeps_all": ("m6jax/model/moe/dispatch.py", "                     live=kept.reshape(-1))",
                          "                     live=None)", 1,
                          ["tests/test_moe_layer.py", "-k", "drops and grouped"]),
    "adafactor_replicated": ("m6jax/train/state.py", "        if drops is not None:\n",
                             "        if False:\n", 1, ["tests/test_adafactor_sharding.py"]),
    "adafactor_drops_swapped": ("m6jax/train/state.py",
                                "col_names = less(drops[0]), less(drops[1])",
                                "col_names = less(drops[1]), less(drops[0])",
                                1, ["tests/test_adafactor_sharding.py"]),
    "vq_no_restart": ("m6jax/vq/model.py",
                      "codebook = jnp.where(dead[:, None], fresh, codebook)",
                      "codebook = codebook", 1, ["tests/test_vq.py"]),
    "pipeline_args_shift": ("m6jax/pipeline.py", "dynamic_index_in_dim(v, m, 0, False), args_mb)",
                            "dynamic_index_in_dim(v, jnp.mod(m + 1, M), 0, False), args_mb)", 1,
                            ["tests/test_pipeline.py", "-m", "", "-k", "equals"]),
    "loader_from_0": ("m6jax/train/loop.py", "batches = pipe.loader(start, config.total_steps,",
                      "batches = pipe.loader(0, config.total_steps,", 1,
                      ["tests/test_photos_e2e.py", "-m", "", "-k", "resumes"]),
    "negative_warmup": ("m6jax/train/optim.py", "if o.warmup_steps < 0 or o.warmup_steps",
                        "if o.warmup_steps", 1,
                        ["tests/test_bad_inputs.py", "-m", "", "-k", "warmup"]),
    "invert_photos": ("m6jax/data/images.py", '(invert == "auto" and digits and image.mean()',
                      '(invert == "auto" and image.mean()', 1, ["tests/test_generate_image.py"]),
    "loss_scale_no_halve": ("m6jax/train/loss_scale.py", "jnp.maximum(scale * 0.5, MIN_SCALE)",
                            "scale", 1, ["tests/test_loss_scale.py", "-k", "halve or overflow"]),
    "show_normalised": ("m6jax/data/images.py", "    imgs = denormalise(imgs)\n", "", 1,
                        ["tests/test_generate_image.py", "-k", "show_input"]),
    "decay_after_lr": ("m6jax/train/optim.py",
                       "        optax.add_decayed_weights(opt_cfg.weight_decay, mask=_decay_mask),\n"
                       "        optax.scale_by_learning_rate(schedule)))",
                       "        optax.scale_by_learning_rate(schedule),\n"
                       "        optax.add_decayed_weights(-opt_cfg.weight_decay, mask=_decay_mask)))",
                       1, ["tests/test_optim.py", "-k", "hand or zero or scaled_by"]),
    "state_in_param_dtype": ("m6jax/train/optim.py", "return tx.init(_float32(params))",
                             "return tx.init(params)", 1, ["tests/test_optim.py", "-k", "float32"]),
    "nearest_rounding": ("m6jax/train/optim.py", "        elif key is None:", "        elif True:",
                         1, ["tests/test_optim.py", "-k", "rounding or 1e4"]),
    "router_in_bf16": ("m6jax/train/state.py", '_FLOAT32_ALWAYS = ("router", "scale", "bias")',
                       "_FLOAT32_ALWAYS = ()", 1, ["tests/test_optim.py", "-k", "router or 1e4"]),
    "accum_in_bf16": ("m6jax/train/step.py", "_ACCUM_DTYPE = jnp.float32",
                      "_ACCUM_DTYPE = jnp.bfloat16", 1, ["tests/test_optim.py", "-k", "accum"]),
    "lr_by_global_step": ("m6jax/train/step.py", 'metrics["learning_rate"] = tx.schedule(count)',
                          'metrics["learning_rate"] = tx.schedule(state.step)', 1,
                          ["tests/test_optim.py", "-k", "logged"]),
    "p2r_adafactor_copied": ("m6jax/pseudo_to_real.py", "dict(v_row=2, v_col=2, v=2)",
                             "dict(v_row=0, v_col=0, v=0)", 1,
                             ["tests/test_pseudo_to_real.py", "-k", "adafactor"]),
    # Issue 31: representation fine-tuning (LoRA, prompt, contrastive recall, pooling).
    "lora_unscaled": ("m6jax/finetune/peft.py", "(w.astype(jnp.float32) + scale * delta)",
                      "(w.astype(jnp.float32) + delta)", 1,
                      ["tests/test_finetune_peft.py", "-k", "side_path"]),
    "lora_trains_base": ("m6jax/finetune/adapt_loop.py",
                         "    if not adaptation.frozen_base:\n        return {}, base",
                         "    if True:\n        return {}, base", 1,
                         ["tests/test_finetune_peft.py", "-k", "only_the_adapter"]),
    "prompt_not_placed": ("m6jax/finetune/peft.py",
                          "out = out.at[:, :n].set(prompt_nd.astype(out.dtype))", "out = out", 1,
                          ["tests/test_finetune_peft.py", "-k", "prompt_slots"]),
    "info_nce_one_way": ("m6jax/finetune/recall.py",
                         "softmax_cross_entropy_with_integer_labels(s.T, labels)",
                         "softmax_cross_entropy_with_integer_labels(s, labels)", 1,
                         ["tests/test_finetune_recall.py", "-k", "info_nce"]),
    "mean_pool_padding": ("m6jax/embed/pooling.py", "w = valid_bs.astype(jnp.float32)",
                          "w = jnp.ones_like(valid_bs, jnp.float32)", 1,
                          ["tests/test_finetune_recall.py", "-k", "mean_pooling"]),
    "lexical_pool_padding": ("m6jax/embed/pooling.py",
                             "jnp.where(valid_bs[:, num_patches:, None], w, 0.0).max(1)",
                             "w.max(1)", 1, ["tests/test_finetune_recall.py", "-k", "lexical"]),
}


def run(name: str) -> bool:
    """True if the broken code made its tests fail."""
    path, old, new, count, tests = CASES[name]
    file = ROOT / path
    src = file.read_text(encoding="utf-8")
    if src.count(old) != count:
        sys.exit(f"{name}: the snippet occurs {src.count(old)} times in {path}, not {count}: "
                 "update CASES to the code")
    file.write_text(src.replace(old, new), encoding="utf-8")
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0",
                            *tests], cwd=ROOT, capture_output=True, text=True)
    finally:
        file.write_text(src, encoding="utf-8")
    summary = [ln for ln in r.stdout.splitlines() if " passed" in ln or " failed" in ln][-1:]
    red = r.returncode == 1
    print(f"{'red  ' if red else 'GREEN'} {name}: {' '.join(summary)}", flush=True)
    return red


if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; one of {sorted(CASES)}")
    sys.exit(0 if all([run(n) for n in names]) else 1)
