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
    # issue 29: data at scale
    "lazy_shards_off": ("m6jax/data/sources.py", "indexed = opener and shard_index.records(f)",
                        "indexed = None", 1, ["tests/test_data_scale.py", "-k", "opens"]),
    "normalise_channels_mixed": ("m6jax/data/images.py",
                                 "np.tile(RGB_MEAN, width), np.tile(RGB_STD, width)",
                                 "np.repeat(RGB_MEAN, width), np.repeat(RGB_STD, width)", 1,
                                 ["tests/test_data_scale.py", "-k", "normalise or bitwise"]),
    "pixels_centre_only": ("m6jax/data/images.py",
                           "x0, y0 = _crop_offset(size - image_size, rng), _crop_offset(size - image_size, rng)",
                           "x0, y0 = _crop_offset(size - image_size, None), _crop_offset(size - image_size, None)",
                           1, ["tests/test_data_scale.py", "-k", "random_window"]),
    "eval_records_unbounded": ("m6jax/data/sources.py",
                               "min(int(round(IMAGE_HOLDOUT_FRACTION * n)), eval_records)",
                               "int(round(IMAGE_HOLDOUT_FRACTION * n))", 1,
                               ["tests/test_data_scale.py", "-k", "eval_records"]),
    "eval_whole_set": ("m6jax/data/pipeline.py", "if chunk and (len(chunk) == size or",
                       "if chunk and (False or", 1,
                       ["tests/test_data_scale.py", "-k", "one_chunk"]),
    "pack_t2i_allowed": ("m6jax/data/config.py", 'if s["pack"] and t2i:', "if False:", 1,
                         ["tests/test_data_scale.py", "-k", "packing"]),
    "grain_read_threads": ("m6jax/data/loader.py", ".to_iter_dataset(read)", ".to_iter_dataset()", 1,
                           ["tests/test_data_scale.py", "-m", "", "-k", "prefetch_batches_ahead"]),
    "codes_dir_ignored": ("m6jax/t2i/data.py", 'if s["codes_dir"]:', "if False:", 1,
                          ["tests/test_t2i_codes.py", "-k", "never_runs"]),
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
    "pipeline_stage_replicates": ("m6jax/pipeline.py", 'constrain(p, ("stage", None, None, *a))',
                                  'constrain(p, ("stage",) + (None,) * (p.ndim - 1))', 1,
                                  ["tests/test_pipeline.py", "-k", "one_unit or stay_sharded"]),
    "dropless_n_fold": ("m6jax/model/moe/parallel.py", "    if not factor:\n        return choices",
                        "    if True:\n        return choices", 1,
                        ["tests/test_moe_parallel.py", "-k", "dropless_bytes or overflow"]),
    "groups_ignore_microbatches": ("m6jax/model/moe/checks.py",
                                   'micro = int(config.pipeline.microbatches) if sizes.get("stage", 1) > 1 else 1',
                                   "micro = 1", 1,
                                   ["tests/test_moe_config.py", "-k", "pipeline_microbatch"]),
    "sorting_under_tensor": ("m6jax/model/moe/checks.py",
                             'if sorting and sizes["tensor"] > 1 and sizes["expert"] == 1:',
                             "if False:", 1, ["tests/test_moe_config.py", "-k", "under_tensor"]),
    "decode_groups_across_rows": ("m6jax/model/m6.py", "(1 if step else num_patches",
                                  "(0 if step else num_patches", 1,
                                  ["tests/test_moe_decode.py"]),
    "checkpoint_minutes_local": ("m6jax/checkpoint.py",
                                 "return _from_process_0(int(due), [])[0] == 1", "return due", 1,
                                 ["tests/test_multihost.py", "-m", "", "-k", "skewed"]),
    "peer_overflow_unreported": ("m6jax/model/moe/layer.py", "kept = valid[..., None] & sent",
                                 "kept = jnp.broadcast_to(valid[..., None], sent.shape)", 1,
                                 ["tests/test_moe_parallel.py", "-m", "", "-k", "counts_peer"]),
    # Issue 26: each phase of an offloaded run keeps the offloaded stacks off the device.
    "offload_init_on_device": ("m6jax/offload.py", "            with compute_on(\"device_host\")"
                               ":\n                return self.store(init_fn())",
                               "            with jax.named_scope(\"init\"):\n                "
                               "return self.store(init_fn())", 1,
                               ["tests/test_offload_phases.py", "-k", "init"]),
    "offload_restore_to_device": ("m6jax/offload.py",
                                  "sh = x.sharding.with_memory_kind(HOST) if host else x.sharding",
                                  "sh = x.sharding", 1, ["tests/test_offload_phases.py", "-k", "restore"]),
    "offload_split_on_device": ("m6jax/offload.py", "            x = to_host(x)\n            "
                                "with compute_on(\"device_host\"):", "            x = fetch(x)\n"
                                "            with jax.named_scope(\"split\"):", 1,
                                ["tests/test_offload_phases.py", "-k", "restore or switch"]),
    "offload_save_join_on_device": ("m6jax/offload_layout.py",
                                    "            parts = [to_host(p) for p in parts]\n"
                                    "            with compute_on(\"device_host\"):",
                                    "            parts = [fetch(p) for p in parts]\n"
                                    "            with jax.named_scope(\"join\"):", 1,
                                    ["tests/test_offload_phases.py", "-k", "save"]),
    "offload_eval_whole_params": ("m6jax/train/step.py",
                                  "params = offload.resident_params(params)",
                                  "params = jax.tree.map(lambda x: jnp.concatenate([jax.device_put("
                                  "p, jax.memory.Space.Device) for p in x.parts]) if hasattr(x, "
                                  "'parts') else x, params, is_leaf=lambda x: hasattr(x, 'parts'))",
                                  1,
                                  ["tests/test_offload_phases.py", "-k", "eval"]),
    "offload_decode_canonical": ("m6jax/model/stack.py",
                                 "        if self.is_initializing() or self.cfg.share_layers:\n"
                                 "            return None\n        layers =",
                                 "        if self.is_initializing() or self.cfg.share_layers or "
                                 "self.decode:\n            return None\n        layers =", 1,
                                 ["tests/test_offload_phases.py", "-k", "decoding"]),
    "offload_save_stored_layout": ("m6jax/offload_layout.py",
                                   "    stored, treedef = jax.tree.flatten(tree, is_leaf=is_segments)\n",
                                   "    return tree\n", 1,
                                   ["tests/test_offload_resume.py", "-m", "slow", "-k",
                                    "restores_without"]),
    "offload_delink_on_device": ("m6jax/pseudo_to_real.py", "            if not on_host:\n",
                                 "            if True:\n", 1,
                                 ["tests/test_offload_phases.py", "-k", "switch"]),
    # Issue 28: masks as vectors, fused kernels per backend, lowering for CUDA/TPU.
    "mask_no_segments": ("m6jax/model/masks.py", "            out &= (sq == sk) | (sq == 0)\n",
                         "            out &= sq == sq\n", 1,
                         ["tests/test_kernels.py", "-k", "dense_mask_is_the_rule"]),
    "step_mask_no_pattern": ("m6jax/model/masks.py", "        if self.pattern is None:\n",
                             "        if True:\n", 1, ["tests/test_kernels.py", "-k", "step_mask"]),
    "fused_one_call": ("m6jax/model/fused.py",
                       "jnp.where(in_prefix[:, :, None, None], bidir[:, :s], causal[:, :s])",
                       "causal[:, :s]", 1,
                       ["tests/test_kernels.py", "-k", "fused_kernel_equals_xla and prefix_lm"]),
    "megablox_pad_first": ("m6jax/model/moe/dispatch.py", "jnp.pad(rows, ((0, extra), (0, 0)))",
                           "jnp.pad(rows, ((extra, 0), (0, 0)))", 1,
                           ["tests/test_kernels.py", "-k", "megablox"]),
    "fused_attention_off": ("m6jax/model/attention.py", '        elif impl in ("splash", "triton"):',
                            "        elif False:", 1,
                            ["tests/test_lowering.py", "-k", "splash or triton"]),
    "sparse_dense_mask": ("m6jax/model/sparse.py",
                          "m = mask.visible(np.arange(g * bs)[:, None], np.arange(nb * bs)[None, :])[:, None]",
                          "m = mask.dense()[:, :, :g * bs]", 1,
                          ["tests/test_lowering.py", "-k", "cuda_long_step_on_blocks"]),
    "flops_full_square": ("m6jax/flops.py", '    if model_cfg.attention != "sparse":\n',
                          "    if True:\n", 1, ["tests/test_flops.py", "-k", "sparse"]),
    "peak_small_matmul": ("m6jax/flops.py", "measure_peak_flops(ACCELERATOR_MATMUL, dtype",
                          "measure_peak_flops(dtype", 1, ["tests/test_flops.py", "-k", "large_matmul"]),
    "vq_one_device": ("m6jax/vq/train.py", "    if mesh is not None:\n        forward_backward = ",
                      "    if False:\n        forward_backward = ", 1,
                      ["tests/test_vq.py", "-k", "mesh"]),
    "fused_gspmd": ("m6jax/model/fused.py", "    if mesh.empty or mesh.size == 1:\n",
                    "    if True:\n", 1, ["tests/test_lowering.py", "-k", "per_device"]),
    "dropless_ragged_on_tpu": ("m6jax/kernels.py",
                               '"gmm": {"cpu": "blocked", "cuda": "mgpu", "tpu": "megablox"}',
                               '"gmm": {"cpu": "blocked", "cuda": "ragged_dot", "tpu": "ragged_dot"}', 1,
                               ["tests/test_lowering.py", "-k", "moe"]),
    "capacity_ignored": ("m6jax/model/moe/layer.py",
                         "dispatch = capacity_impl(cfg.dispatch, self.kernels)",
                         "dispatch = cfg.dispatch", 1,
                         ["tests/test_moe_layer.py", "-k", "capacity_dispatch"]),
    "capacity_gather_on_cpu": ("m6jax/kernels.py",
                               '"capacity": {"cpu": "grouped", "cuda": "gather", "tpu": "gather"}',
                               '"capacity": {"cpu": "gather", "cuda": "gather", "tpu": "gather"}', 1,
                               ["tests/test_moe_config.py", "-k", "capacity"]),
    "dropless_blocked_on_cuda": ("m6jax/kernels.py",
                                 '"gmm": {"cpu": "blocked", "cuda": "mgpu", "tpu": "megablox"}',
                                 '"gmm": {"cpu": "blocked", "cuda": "blocked", "tpu": "megablox"}', 1,
                                 ["tests/test_lowering.py", "-k", "mosaic_gpu"]),
    "mgpu_dead_rows_gradient": ("m6jax/model/moe/mgpu.py",
                                "return _live(drows, sizes), dw.astype(w.dtype), None",
                                "return drows, dw.astype(w.dtype), None", 1,
                                ["tests/test_kernels.py", "-k", "mgpu"]),
    "mgpu_weight_grad_unpadded_rows": ("m6jax/model/moe/mgpu.py",
                                       'dw = KERNELS["transposed"](rows_p, dy_p, sizes)[:, :k, :m]',
                                       'dw = KERNELS["transposed"](rows_p, dy_p, sizes * 0)[:, :k, :m]', 1,
                                       ["tests/test_kernels.py", "-k", "mgpu"]),
    # Issue 28, block-sparse Triton kernel (m6jax/model/sparse_triton.py).
    "sparse_triton_no_segments": ("m6jax/model/sparse_triton.py",
                                  "same = (seg_q[:, None] == seg_k[None, :]) | (seg_q[:, None] == 0)",
                                  "same = seg_q[:, None] == seg_q[:, None]", 1,
                                  ["tests/test_kernels.py", "-k", "triton_sparse_equals and packed"]),
    "sparse_triton_dkv_forward_table": ("m6jax/model/sparse_triton.py",
                                        ")(jnp.asarray(idx_t), jnp.asarray(counts_t), q, k, v,",
                                        ")(jnp.asarray(idx), jnp.asarray(counts), q, k, v,", 1,
                                        ["tests/test_kernels.py", "-k", "triton_sparse_gradients"]),
    "sparse_triton_empty_rows": ("m6jax/model/sparse_triton.py",
                                 "m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)",
                                 "m_safe = m_new", 1,
                                 ["tests/test_kernels.py", "-k", "triton_sparse_equals and padding"]),
    "sparse_cuda_on_blocks": ("m6jax/kernels.py",
                              '"sparse_attention": {"cpu": "blocks", "cuda": "triton", "tpu": "splash"}',
                              '"sparse_attention": {"cpu": "blocks", "cuda": "blocks", "tpu": "splash"}', 1,
                              ["tests/test_lowering.py", "-k", "cuda_long_step_runs_sparse_triton"]),
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
    "terms_pool_task_token": ("m6jax/embed/pooling.py",
                              "jnp.asarray(text_valid_bt).at[:, 0].set(False)",
                              "jnp.asarray(text_valid_bt)", 1,
                              ["tests/test_finetune_recall.py", "-k", "terms"]),
    "terms_pool_padding": ("m6jax/embed/pooling.py",
                           "jnp.where(held, jax.nn.softplus(own), 0.0)", "jax.nn.softplus(own)", 1,
                           ["tests/test_finetune_recall.py", "-k", "terms"]),
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
