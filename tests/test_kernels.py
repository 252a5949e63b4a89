"""Masks carried as vectors give today's dense masks; the fused kernels (Pallas, in
interpret mode on CPU: splash and Triton attention, megablox gmm) agree with the XLA
paths and with references built here; the kernel table picks per platform.

The reference mask is built here by a per-(row, query, key) loop from the rule in words
(m6jax/model/masks.py's docstring), not from the model's code.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6jax import kernels
from m6jax.model import fused
from m6jax.model.masks import StepMask, attention_mask
from m6jax.model.sparse import Pattern, sparse_attention
from m6jax.model.sparse_triton import sparse_flash_attention

P, T, H, DH = 4, 12, 2, 8
S = P + T


def _rule(image, text, prefix, seg=None):
    """bool [B, S, S] by a loop: k visible from q iff k is real and (k in the prefix or
    k <= q), and for a real query of a packed row, k in q's example."""
    valid = np.concatenate([image, text], 1)
    pre = np.concatenate([image, prefix & text], 1)
    b, s = valid.shape
    out = np.zeros((b, s, s), bool)
    for r in range(b):
        for q in range(s):
            for k in range(s):
                ok = valid[r, k] and (pre[r, k] or k <= q)
                if seg is not None and seg[r, q] != 0:
                    ok = ok and seg[r, q] == seg[r, k]
                out[r, q, k] = ok
    return out


def _kinds():
    """name -> (image_mask, text_mask, text_is_prefix, segment_ids) over 2 rows."""
    img, no_img = np.ones((2, P), bool), np.zeros((2, P), bool)
    full = np.ones((2, T), bool)
    lengths = np.arange(T)[None] < np.array([[T], [7]])             # row 1: 5 pads
    src = np.arange(T)[None] < np.array([[3], [5]])
    seg = np.zeros((2, S), np.int32)                                  # 2 + 1 examples
    seg[0, P:P + 5], seg[0, P + 5:P + 10], seg[1, P:P + 9] = 1, 2, 1
    packed_text = seg[:, P:] > 0
    packed_src = np.zeros((2, T), bool)
    packed_src[0, [0, 1, 5]] = packed_src[1, [0, 1, 2]] = True       # each example's source
    return {
        "prefix_lm": (img, full, src, None),
        "causal": (no_img, full, np.zeros((2, T), bool), None),
        "padding": (np.array([[1] * P, [0] * P], bool), lengths, src, None),
        "packed": (no_img, packed_text, packed_src & packed_text, seg),
    }


KINDS = _kinds()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_dense_mask_is_the_rule(kind):
    image, text, prefix, seg = KINDS[kind]
    got = np.asarray(attention_mask(image, text, prefix, seg).dense())[:, 0]
    np.testing.assert_array_equal(got, _rule(image, text, prefix, seg))


def test_step_mask_is_filled_slots_and_pattern_row():
    pattern, slots = Pattern(4, 1, 3, 1), 32          # 8 blocks: block 5 skips 1, 3, 7
    filled = np.random.default_rng(0).random((2, slots)) < 0.7
    for slot in (3, 20, 30):
        got = np.asarray(StepMask(jnp.asarray(filled), jnp.int32(slot), pattern).dense())
        want = filled & pattern.mask(slots)[slot][None]
        assert not pattern.mask(slots)[slot].all() or slot == 3
        np.testing.assert_array_equal(got[:, 0, 0], want)
        dense_only = np.asarray(StepMask(jnp.asarray(filled), jnp.int32(slot)).dense())
        np.testing.assert_array_equal(dense_only[:, 0, 0], filled)


def _qkv(seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (2, S, H, DH)) for k in ks)


def _reference(q, k, v, dense):
    return jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(dense)[:, None],
                                        implementation="xla")


def _real_rows(image, text):
    return np.concatenate([image, text], 1)


# Interpret mode is slow on 2 cores; one jitted call per (impl, kind) keeps it seconds.
@pytest.mark.parametrize("impl", ["splash", "triton"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fused_kernel_equals_xla(impl, kind):
    image, text, prefix, seg = KINDS[kind]
    q, k, v = _qkv()
    mask = attention_mask(image, text, prefix, seg)
    got = jax.jit(lambda q, k, v: fused.attend(impl, q, k, v, mask, interpret=True))(q, k, v)
    want = _reference(q, k, v, _rule(image, text, prefix, seg))
    rows = _real_rows(image, text)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-5)


@pytest.mark.parametrize("kind", ["prefix_lm", "padding"])
def test_splash_sparse_equals_blocks_and_dense(kind):
    image, text, prefix, seg = KINDS[kind]
    pattern = Pattern(4, 1, 3, 1)
    q, k, v = _qkv(1)
    mask = attention_mask(image, text, prefix, seg)
    got = jax.jit(lambda q, k, v: fused.attend("splash", q, k, v, mask, pattern,
                                               interpret=True))(q, k, v)
    blocks = jax.jit(lambda q, k, v: sparse_attention(q, k, v, mask, pattern))(q, k, v)
    want = _reference(q, k, v, _rule(image, text, prefix, seg) & pattern.mask(S)[None])
    rows = _real_rows(image, text)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-5)
    np.testing.assert_allclose(np.asarray(blocks)[rows], np.asarray(want)[rows], atol=2e-5)


def test_splash_gradients_equal_xla():
    image, text, prefix, seg = KINDS["padding"]
    q, k, v = _qkv(2)
    mask = attention_mask(image, text, prefix, seg)
    w = jnp.asarray(_real_rows(image, text), jnp.float32)[..., None, None]
    dense = _rule(image, text, prefix, seg)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * w)

    got = jax.jit(jax.grad(loss(lambda q, k, v: fused.attend("splash", q, k, v, mask,
                                                             interpret=True)), (0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: _reference(q, k, v, dense)), (0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


# The block-sparse Triton kernel (interpret mode) on a sequence of whole kernel tiles:
# 8 blocks of 32; block 5 keeps key blocks 0, 2, 4, 5, 6 and skips 1, 3, 7.
SP_P, SP_T, SP_BLOCK = 64, 192, 32
SP_S = SP_P + SP_T
SP_PATTERN = Pattern(SP_BLOCK, window=1, stride=3, global_blocks=1)


def _sparse_kinds():
    """name -> attention_mask arguments over 2 rows of SP_S slots."""
    pos = np.arange(SP_T)[None]
    img = np.array([[1] * SP_P, [0] * SP_P], bool)                   # row 1: no image
    full = np.ones((2, SP_T), bool)
    src = pos < np.array([[20], [70]])
    lengths = pos < np.array([[SP_T], [100]])                        # row 1: 92 pads
    seg = np.zeros((2, SP_S), np.int32)                              # 3 + 2 examples
    seg[0, :SP_P + 40], seg[0, SP_P + 40:SP_P + 130], seg[0, SP_P + 130:] = 1, 2, 3
    seg[1, SP_P:SP_P + 90], seg[1, SP_P + 90:SP_P + 150] = 1, 2
    packed_src = np.zeros((2, SP_T), bool)
    for r, starts in enumerate(([0, 40, 130], [0, 90])):
        for a in starts:
            packed_src[r, a:a + 10] = True                           # each example's source
    packed_text = seg[:, SP_P:] > 0
    return {
        "prefix_lm_missing_image": (img, full, src, None),
        # row 1: no image, no source, 92 pads: its image slots see no key at all
        "padding": (img, lengths, src & lengths & np.array([[True], [False]]), None),
        "packed": (img, packed_text, packed_src & packed_text, seg),
    }


SPARSE_KINDS = _sparse_kinds()


def _sparse_case(kind, seed):
    mask = attention_mask(*SPARSE_KINDS[kind])
    ks = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(kk, (2, SP_S, 2, 32)) for kk in ks)
    dense = np.asarray(mask.dense()) & SP_PATTERN.mask(SP_S)[None, None]   # [B, 1, S, S]
    seen = dense[:, 0].any(-1)                               # [B, S]: rows with a key
    return q, k, v, mask, dense, seen


@pytest.mark.parametrize("kind", sorted(SPARSE_KINDS))
def test_triton_sparse_equals_blocks_and_dense(kind):
    q, k, v, mask, dense, seen = _sparse_case(kind, 4)
    got = jax.jit(lambda q, k, v: sparse_flash_attention(q, k, v, mask, SP_PATTERN,
                                                         interpret=True))(q, k, v)
    blocks = jax.jit(lambda q, k, v: sparse_attention(q, k, v, mask, SP_PATTERN))(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(dense), implementation="xla")
    assert 0 < seen.sum() < seen.size or kind != "padding"
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(want)[seen], atol=2e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(blocks), atol=2e-5)  # 0 unseen


@pytest.mark.parametrize("kind", ["packed", "prefix_lm_missing_image"])
def test_triton_sparse_gradients_equal_blocks(kind):
    q, k, v, mask, _, seen = _sparse_case(kind, 5)
    w = jnp.asarray(seen, jnp.float32)[..., None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * w)

    got = jax.jit(jax.grad(loss(lambda q, k, v: sparse_flash_attention(
        q, k, v, mask, SP_PATTERN, interpret=True)), (0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(lambda q, k, v: sparse_attention(q, k, v, mask, SP_PATTERN)),
                            (0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=f"d{name}")


def test_triton_sparse_per_device_under_a_mesh_equals_blocks(devices):
    """fused.attend's route for CUDA block-sparse, run per device (shard_map over batch
    and heads, data 2 x tensor 2) in interpret mode, equals the blocks path."""
    from helpers import tiny_config
    from m6jax import sharding
    q, k, v, mask, _, _ = _sparse_case("packed", 6)
    mesh = sharding.make_mesh(tiny_config(data=2, tensor=2).mesh, devices[:4])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        got = jax.jit(lambda q, k, v: fused.attend("triton", q, k, v, mask, SP_PATTERN,
                                                   interpret=True))(q, k, v)
    want = jax.jit(lambda q, k, v: sparse_attention(q, k, v, mask, SP_PATTERN))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_triton_sparse_on_a_partial_last_block_equals_blocks():
    """A decode prefill shorter than the trained sequence (200 = 6 blocks of 32 + 8):
    padded to whole blocks inside, the same as the blocks path."""
    img, text, src, _ = SPARSE_KINDS["prefix_lm_missing_image"]
    mask = attention_mask(img, text[:, :136], src[:, :136])
    q, k, v = (a[:, :200] for a in _sparse_case("prefix_lm_missing_image", 8)[:3])
    got = jax.jit(lambda q, k, v: sparse_flash_attention(q, k, v, mask, SP_PATTERN,
                                                         interpret=True))(q, k, v)
    want = sparse_attention(q, k, v, mask, SP_PATTERN)
    assert got.shape == (2, 200, 2, 32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_triton_sparse_bfloat16_equals_blocks_in_float32():
    """bf16 q, k, v (the long config's dtype): output bf16, within bf16 rounding of the
    f32 blocks path (measured 2.5e-3; the blocks path run in bf16: 7.4e-3)."""
    q, k, v, mask, _, _ = _sparse_case("prefix_lm_missing_image", 7)
    half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    got = jax.jit(lambda q, k, v: sparse_flash_attention(q, k, v, mask, SP_PATTERN,
                                                         interpret=True))(*half)
    want = sparse_attention(*[a.astype(jnp.float32) for a in half], mask, SP_PATTERN)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=1e-2)


def test_triton_sparse_refuses_a_block_it_cannot_tile():
    q = jnp.zeros((1, 48, 1, 16))
    mask = attention_mask(np.ones((1, 0), bool), np.ones((1, 48), bool), np.zeros((1, 48), bool))
    with pytest.raises(ValueError, match="model.sparse_block_size=24"):
        sparse_flash_attention(q, q, q, mask, Pattern(24), interpret=True)


def test_config_check_refuses_a_sparse_block_triton_cannot_tile():
    from helpers import tiny_config
    c = tiny_config()
    from m6jax.config_checks import validate_config
    seq = (c.data.image_size // c.data.patch_size) ** 2 + c.data.text_len   # 28: divides
    c.model.update(attention="sparse", sparse_block_size=seq, kernels="sparse_attention=triton")
    with pytest.raises(ValueError, match=rf"model.sparse_block_size={seq}: .*power of two"):
        validate_config(c, 1)
    c.model.kernels = ""                                 # CPU: blocks, any block size
    validate_config(c, 1)


def test_kernel_table_per_platform_and_override():
    assert kernels.resolve("attention") == "xla"          # this CPU machine
    assert kernels.resolve("sparse_attention") == "blocks"
    assert kernels.resolve("gmm") == "blocked"
    with kernels.lowering_for("tpu"):
        assert kernels.resolve("attention") == "splash" and kernels.interpret("splash") is False
        assert kernels.resolve("gmm") == "megablox"
        assert kernels.resolve("attention", "attention=xla") == "xla"
    with kernels.lowering_for("cuda"):
        assert kernels.resolve("attention") == "triton"
        assert kernels.resolve("sparse_attention") == "triton"   # our block-sparse kernel
    assert kernels.interpret("splash") is True             # off its platform
    with pytest.raises(ValueError, match="model.kernels"):
        kernels.parse("attention=cudnn")


@pytest.fixture(scope="module")
def tiny_model_logits():
    """The tiny M6's logits on the XLA path (and its params, batch and config)."""
    from helpers import synthetic_batch, tiny_config
    from m6jax.model import build
    config = tiny_config()
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(4).items()}
    model = build.build_model(config)
    params = model.init(jax.random.key(0), batch)["params"]
    return config, params, batch, model.apply({"params": params}, batch)


def test_model_on_splash_equals_xla_on_a_mesh(tiny_model_logits, devices):
    """model.kernels='attention=splash' (interpret mode here) through the whole M6, run
    per device under a data x tensor mesh (the kernel's shard_map), on the real tokens."""
    from m6jax import sharding
    from m6jax.model import build
    config, params, batch, want = tiny_model_logits
    with config.unlocked():
        config.model.kernels = "attention=splash"
        config.mesh.update(data=2, tensor=2)
    mesh = sharding.make_mesh(config.mesh, devices[:4])
    model = build.build_model(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        got = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
    rows = np.asarray(batch["text_mask"])
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-4)


@pytest.fixture
def mgpu_references(monkeypatch):
    """Mosaic GPU kernels have no interpret mode: swap in their documented semantics
    (jax.lax.ragged_dot_general) so the CPU checks our padding, masking and VJP."""
    from m6jax.model.moe import mgpu
    monkeypatch.setattr(mgpu, "KERNELS", mgpu.reference_kernels())


@pytest.mark.parametrize("impl", ["megablox", "mgpu"])
def test_dropless_kernel_equals_a_per_choice_loop_values_and_gradients(impl, request):
    """model.moe.dispatch='megablox' (interpret mode) or 'mgpu' (references for jax's
    kernels): every choice through its expert, against a loop over choices; gradients
    against the same loop's autodiff. Widths 16 / 32 exercise mgpu's tile padding."""
    from m6jax.model.moe import dispatch as dsp
    if impl == "mgpu":
        request.getfixturevalue("mgpu_references")
    g, s, d, m, e, k = 2, 24, 16, 32, 4, 2
    ks = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(ks[0], (g, s, d))
    wi = jax.random.normal(ks[1], (e, d, m)) * 0.3
    wo = jax.random.normal(ks[2], (e, m, d)) * 0.3
    expert = jax.random.randint(ks[3], (g, s, k), 0, e)
    weight = jax.nn.softmax(jax.random.normal(ks[3], (g, s, k)), -1)
    routing = dsp.Routing(expert, weight, None, None, None)

    def loop(x, wi, wo):
        out = jnp.zeros_like(x)
        for c in range(k):
            ei = expert[..., c]
            y = jnp.einsum("gsm,gsmd->gsd", jax.nn.gelu(jnp.einsum("gsd,gsdm->gsm", x, wi[ei])),
                           wo[ei])
            out = out + y * weight[..., c:c + 1]
        return out

    got = jax.jit(lambda *a: dsp.dropless_ragged(*a, jax.nn.gelu, impl))
    args = (x, routing, wi, wo)
    np.testing.assert_allclose(np.asarray(got(*args)), np.asarray(loop(x, wi, wo)),
                               atol=1e-4, rtol=1e-4)
    loss = lambda f: lambda x, wi, wo: jnp.sum(jnp.sin(f(x, wi, wo)))  # noqa: E731
    g_got = jax.jit(jax.grad(loss(lambda x, wi, wo: dsp.dropless_ragged(
        x, routing, wi, wo, jax.nn.gelu, impl)), (0, 1, 2)))(x, wi, wo)
    g_want = jax.grad(loss(loop), (0, 1, 2))(x, wi, wo)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_mgpu_rows_past_the_groups_are_zero_in_values_and_gradients(mgpu_references):
    """Expert parallelism's received buffer has dead rows (no group): the kernels leave
    them unwritten, so mgpu.gmm must give them 0 and pass them no gradient."""
    from m6jax.model.moe import dispatch as dsp
    n, d, m, e = 40, 16, 24, 3
    ks = jax.random.split(jax.random.key(5), 4)
    rows = jax.random.normal(ks[0], (n, d))
    wi = jax.random.normal(ks[1], (e, d, m)) * 0.3
    wo = jax.random.normal(ks[2], (e, m, d)) * 0.3
    expert = jax.random.randint(ks[3], (n,), 0, e)
    live = jnp.arange(n) % 3 != 0

    def want(rows, wi, wo):  # per row, by hand
        h = jax.nn.gelu(jnp.einsum("nd,ndm->nm", rows, wi[expert]))
        return jnp.where(live[:, None], jnp.einsum("nm,nmd->nd", h, wo[expert]), 0)

    got = lambda rows, wi, wo: dsp.expert_mlp_rows(  # noqa: E731
        rows, expert, live, wi, wo, jax.nn.gelu, "mgpu")
    np.testing.assert_allclose(np.asarray(jax.jit(got)(rows, wi, wo)),
                               np.asarray(want(rows, wi, wo)), atol=1e-5)
    from m6jax.model.moe import mgpu
    sizes = jnp.array([10, 0, 20], jnp.int32)                          # rows 30.. in no group
    assert np.all(np.asarray(mgpu.gmm(rows, wi, sizes))[30:] == 0)
    loss = lambda f: lambda *a: jnp.sum(jnp.cos(f(*a)))  # noqa: E731
    for a, b in zip(jax.jit(jax.grad(loss(got), (0, 1, 2)))(rows, wi, wo),
                    jax.grad(loss(want), (0, 1, 2))(rows, wi, wo)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_mgpu_is_the_cuda_dropless_kernel_on_hopper_only(monkeypatch):
    """WGMMA is sm_90's: an A100 (8.0) or a Blackwell (10.0) runs `blocked`."""
    import types
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")
    for capability, impl in (("9.0", "mgpu"), ("8.0", "blocked"), ("10.0", "blocked")):
        gpu = types.SimpleNamespace(compute_capability=capability)
        monkeypatch.setattr(kernels.jax, "devices", lambda *a, gpu=gpu: [gpu])
        assert kernels.resolve("gmm") == impl, capability
    assert kernels.resolve("gmm", "gmm=mgpu") == "mgpu"            # the user's choice wins


def test_mgpu_is_the_cuda_dropless_kernel_for_16_bit_models_only():
    """The table's CUDA entry, the f32 fallback (WGMMA takes 16-bit operands) and the
    refusal of an explicit mgpu for an f32 model or off CUDA, each naming the field."""
    from m6jax.model.moe import mgpu
    from m6jax.model.moe.layer import dropless_impl
    with kernels.lowering_for("cuda"):
        assert dropless_impl("dropless", "", jnp.bfloat16) == "mgpu"
        assert dropless_impl("dropless", "", jnp.float32) == "blocked"
        with pytest.raises(ValueError, match="model.dtype=bfloat16"):
            dropless_impl("dropless", "gmm=mgpu", jnp.float32)
    x = jnp.ones((8, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="use blocked"):
        mgpu.gmm(x, jnp.ones((2, 64, 64), jnp.bfloat16), jnp.array([4, 4], jnp.int32))
