"""LoRA and prompt tuning (m6jax/finetune/peft.py): the adapter against an unmerged
reference, a fine-tune that changes only the adapter, adapter checkpoints, sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import GRID, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config

from m6jax import sharding
from m6jax.finetune import adapt_loop, peft
from m6jax.finetune.config import base_config
from m6jax.model import M6
from m6jax.train import optim
from m6jax.train.losses import text_loss
from m6jax.train.state import create_train_state, dummy_batch

MODEL_KEYS = ("patches", "image_mask", "text_tokens", "text_mask", "text_is_prefix")


@pytest.fixture(scope="module")
def tiny(devices):
    config = tiny_config(data=8)
    model = M6(config.model, GRID, TEXT_LEN)
    mesh = sharding.make_mesh(config.mesh, devices)
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    state, _ = create_train_state(model, tx, dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN),
                                  mesh, seed=0)
    return config, model, mesh, state.params


@pytest.fixture(scope="module")
def host_params(tiny):
    return jax.tree.map(np.asarray, tiny[3])


def _apply(model, adaptation):
    """Jitted (base, trainable, batch) -> logits of the adapted model."""
    return jax.jit(lambda b, t, x: adaptation.apply(model, b, t, x)[0])


def _plain(model):
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


def _random_adapter(adaptation, base, seed=1):
    """An adapter with B != 0 (a trained one), so the merge is not the identity."""
    ad = adaptation.init(base, jax.random.key(seed))
    return jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed + 1), x.shape) * 0.3, ad)


def test_lora_merge_equals_the_unmerged_side_path(tiny):
    """x W' = x W + (alpha / r) (x A) B: the merged MLP kernels against the paper's
    unmerged form, added to each Dense output by an interceptor (one layer: no scan index)."""
    config = tiny_config(data=8)
    config.model.num_layers = 1
    model = M6(config.model, GRID, TEXT_LEN)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(4).items() if k in MODEL_KEYS}
    base = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    lora = peft.Adaptation("lora", rank=2, alpha=6.0, targets=("wi", "wo"))
    ad = _random_adapter(lora, base)
    merged = _apply(model, lora)(base, ad, batch)

    def side_path(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = context.module.name
        if name in ("wi", "wo") and context.method_name == "__call__":
            a, b = ad[name]["a"][0], ad[name]["b"][0]
            out = out + 3.0 * (args[0] @ a) @ b  # alpha / rank = 3
        return out

    def unmerged(p, x):
        with nn.intercept_methods(side_path):
            return model.apply({"params": p}, x)

    want = jax.jit(unmerged)(base, batch)
    np.testing.assert_allclose(merged, want, rtol=2e-4, atol=2e-4)


def test_lora_attention_kernels_get_the_low_rank_sum_per_layer(host_params):
    base = host_params
    lora = peft.Adaptation("lora", rank=2, alpha=2.0, targets=("query", "out"))
    ad = _random_adapter(lora, base)
    merged = lora.merge(base, ad)
    for name, (path, n_in) in (("query", (("attn", "query"), 1)), ("out", (("attn", "out"), 2))):
        w = np.asarray(peft._at(base["stack"]["layers"], path))
        got = np.asarray(peft._at(merged["stack"]["layers"], path))
        for layer in range(w.shape[0]):  # per layer, by hand: W_l + 1.0 * A_l B_l
            delta = np.asarray(ad[name]["a"][layer]) @ np.asarray(ad[name]["b"][layer])
            np.testing.assert_allclose(got[layer], w[layer] + delta.reshape(w.shape[1:]),
                                       rtol=1e-5, atol=1e-5)
    assert merged["stack"]["layers"]["mlp"] is base["stack"]["layers"]["mlp"]  # untargeted


def test_lora_starts_as_the_pretrained_model(tiny, host_params):
    model, base = tiny[1], host_params
    lora = peft.Adaptation("lora")
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(4).items() if k in MODEL_KEYS}
    got = _apply(model, lora)(base, lora.init(base, jax.random.key(0)), batch)
    np.testing.assert_allclose(got, _plain(model)(base, batch), rtol=1e-6, atol=1e-6)


def test_prompt_slots_equal_those_tokens_typed_in_front(tiny):
    """A prompt set to the embeddings of tokens t gives the logits of t prepended."""
    _, model, _, base = tiny
    n, ids = 3, np.array([11, 12, 13])
    prompt = peft.Adaptation("prompt", prompt_length=n)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(4).items() if k in MODEL_KEYS}
    batch = {k: (v[:, :TEXT_LEN - n] if k.startswith("text_") else v) for k, v in batch.items()}
    trainable = {"prompt": base["token_emb"]["embedding"][ids]}
    got, hidden = jax.jit(lambda b, t, x: prompt.apply(model, b, t, x)[:2])(base, trainable, batch)

    typed = dict(batch)
    lead = {"text_tokens": np.broadcast_to(ids, (4, n)), "text_mask": np.ones((4, n), bool),
            "text_is_prefix": np.ones((4, n), bool)}
    for k, v in lead.items():
        typed[k] = jnp.concatenate([jnp.asarray(v, batch[k].dtype), batch[k]], axis=1)
    want = _plain(model)(base, typed)[:, n:]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert hidden.shape[1] == GRID * GRID + TEXT_LEN - n


def _train(tiny, adaptation, steps=3):
    config, model, mesh, params = tiny
    config = config.copy_and_resolve_references()
    base = jax.tree.map(jnp.copy, params)
    step_base, trainable = adapt_loop.init_trainable(adaptation, base, mesh, 0)
    before_base = jax.tree.map(np.asarray, params)
    before = jax.tree.map(np.asarray, trainable)

    def loss_fn(logits, hidden, batch):
        return text_loss(logits, batch, 4)[0], {}

    tx = optim.make_optimizer(config.optimizer, steps)
    step = adapt_loop.make_step(model, adaptation, tx, loss_fn)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init)(trainable)
        for i in range(steps):
            batch = sharding.global_batch(mesh, synthetic_batch(8, seed=i))
            trainable, opt_state, _ = step(trainable, opt_state, step_base, batch)
    return step_base, before_base, before, trainable, opt_state


def test_a_lora_finetune_changes_only_the_adapter(tiny):
    lora = peft.Adaptation("lora")
    base, before_base, before, trainable, opt_state = _train(tiny, lora)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), before_base)
    assert not np.array_equal(np.asarray(trainable["wi"]["b"]), before["wi"]["b"])
    # The optimizer state is Adam's two moments of the adapter (+ scalar counts), no more.
    state_elems = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)
    assert state_elems == 2 * sum(x.size for x in jax.tree.leaves(trainable))


def test_adapter_checkpoint_loads_onto_the_base(tiny, host_params, tmp_path):
    model, params = tiny[1], host_params
    lora = peft.Adaptation("lora", rank=3, alpha=5.0)
    ad = _random_adapter(lora, params)
    peft.save_adapter(str(tmp_path / "adapter"), lora, ad, "base-step-dir")
    loaded_lora, loaded = peft.load_adapter(str(tmp_path / "adapter"), params)
    assert loaded_lora == lora
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(4).items() if k in MODEL_KEYS}
    np.testing.assert_array_equal(_apply(model, loaded_lora)(params, loaded, batch),
                                  _apply(model, lora)(params, ad, batch))


def test_default_rank_adapter_is_under_5_percent_of_cpu_hour():
    """Counted from abstract shapes of m6.py:cpu_hour (nothing allocated); by hand a
    layer's LoRA is r * (in + out) per kernel: 3 * 2 * 256 + (256 + 256) + 2 * (256 + 1024),
    and the token table's r * (2000 + 256)."""
    from configs import m6 as m6_config
    from m6jax.model.build import build_model
    from m6jax.finetune.loop import example_batch
    c = m6_config.get_config("cpu_hour")
    ex = {k: v for k, v in example_batch(c).items() if k in MODEL_KEYS}
    base = jax.eval_shape(lambda: nn.meta.unbox(build_model(c).init(jax.random.key(0), ex)))
    ft = base_config("sentiment")
    ft.method = "lora"
    lora = peft.Adaptation.from_config(ft)
    ad = jax.eval_shape(lambda: lora.init(base["params"], jax.random.key(0)))
    per_layer = lora.rank * (3 * 2 * 256 + 2 * 256 + 2 * (256 + 1024))
    assert peft.tree_bytes(ad) == 4 * (6 * per_layer + lora.rank * (2000 + 256))
    assert peft.tree_bytes(ad) <= 0.05 * peft.tree_bytes(base["params"])


def test_bad_method_fields_are_refused_naming_the_field():
    from m6jax.finetune.config import validate_finetune_config
    for field, value, words in (("method", "adapter", "method="), ("lora.rank", 0, "lora.rank"),
                                ("lora.targets", "q", "lora.targets")):
        c = base_config("sentiment")
        c.label_words, c.prompt_suffix, c.eval_reviews, c.baseline_train_reviews = "a,b", "", 0, 0
        section, _, name = field.rpartition(".")
        (c[section] if section else c)[name] = value
        with pytest.raises(ValueError, match=words):
            validate_finetune_config(c)
    c = base_config("caption")
    c.method = "prompt"
    with pytest.raises(ValueError, match="method=prompt"):
        validate_finetune_config(c)


def test_lora_on_the_token_table_adds_its_low_rank_sum(host_params):
    base = host_params
    lora = peft.Adaptation("lora", rank=2, alpha=4.0, targets=("token_emb", "wi"))
    ad = _random_adapter(lora, base)
    merged = lora.merge(base, ad)
    w = np.asarray(base["token_emb"]["embedding"])
    delta = np.asarray(ad["token_emb"]["a"][0]) @ np.asarray(ad["token_emb"]["b"][0])
    np.testing.assert_allclose(merged["token_emb"]["embedding"], w + 2.0 * delta, rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(merged["stack"]["layers"]["mlp"]["wi"]["kernel"],
                           base["stack"]["layers"]["mlp"]["wi"]["kernel"])
