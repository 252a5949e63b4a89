"""MoE KV-cache decoding routes each sequence in its own group: a sequence's tokens (and
the logits they were chosen from) do not depend on what else is in the batch."""
import jax
import numpy as np

from configs.m6_moe import moe_section
from m6jax import generate, sharding
from test_generate import _dense_config, _setup

PROMPT_LEN, MAX_NEW = 2, 8


def test_a_sequence_decodes_the_same_alone_and_in_a_batch(devices):
    # group_size 2 and capacity 1.0 over 4 experts: were two sequences' one-token steps
    # one routing group (as the training step groups tokens), they would share 1 slot
    # per expert, and the second of two sequences picking one expert would drop.
    c = _dense_config()
    c.model.moe = moe_section(num_experts=4, k=1, every=2, group_size=2,
                              capacity_factor=1.0, eval_capacity_factor=1.0)
    model, mesh, params, param_sh, x = _setup(c, devices[:1])
    decode = generate.make_decoder(model, mesh, param_sh, PROMPT_LEN, MAX_NEW, -1,
                                   return_logits=True)
    x = jax.tree.map(np.asarray, x)
    with jax.set_mesh(mesh):
        tokens, logits = map(np.asarray, decode(params, x["patches"], x["image_mask"],
                                                x["prompt"]))
        for row in range(tokens.shape[0]):
            one = {k: sharding.shard_full_batch(mesh, {k: v[row:row + 1]})[k] for k, v in x.items()}
            t1, l1 = map(np.asarray, decode(params, one["patches"], one["image_mask"],
                                            one["prompt"]))
            np.testing.assert_array_equal(t1[0], tokens[row], err_msg=f"row {row}")
            np.testing.assert_allclose(l1[0], logits[row], rtol=1e-5, atol=1e-5,
                                       err_msg=f"row {row}")
