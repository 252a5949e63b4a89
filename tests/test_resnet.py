"""model.image_encoder='resnet': a CNN whose last feature map is the patch grid."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from m6jax import sharding
from m6jax.data import images
from m6jax.model.resnet import ResNetEncoder, unpatchify
from m6jax.train.state import dummy_batch

# 16x16 RGB images, patch 4: two stride-2 stages, a 4x4 grid.
SIZE, PATCH, GRID, T = 16, 4, 4, 12
PATCH_DIM = PATCH * PATCH * 3


def _config(**mesh):
    c = tiny_config(**mesh)
    c.model.update(image_encoder="resnet", resnet_width=8)
    c.data.update(image_size=SIZE, patch_size=PATCH, image_channels=3)
    return c


def _batch(b=8, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.random((b, SIZE, SIZE, 3)).astype(np.float32)
    batch = {k: np.asarray(v) for k, v in dummy_batch(b, GRID * GRID, PATCH_DIM, T).items()}
    batch["patches"] = np.stack([images.patchify(im, PATCH) for im in imgs])
    batch["text_tokens"] = rng.integers(4, 64, (b, T)).astype(np.int32)
    batch["targets"] = rng.integers(4, 64, (b, T)).astype(np.int32)
    batch["loss_mask"] = np.ones((b, T), np.float32)
    return batch, imgs


def test_unpatchify_inverts_patchify_for_rgb_and_grey():
    rng = np.random.default_rng(0)
    for channels in (1, 3):
        im = rng.random((SIZE, SIZE, channels)).astype(np.float32)
        back = unpatchify(jnp.asarray(images.patchify(im, PATCH))[None], GRID)[0]
        np.testing.assert_array_equal(back, im)


@pytest.fixture(scope="module")
def encoder():
    """(module, abstract boxed params, patches [8, P, D], its output, output with patch 0
    changed). Weights are drawn in numpy from the init's shapes: XLA's CPU compile of a
    CNN's init costs tens of seconds, its apply a few."""
    enc = ResNetEncoder(_config().model, GRID, jnp.float32)
    patches = _batch()[0]["patches"]
    changed = patches.copy()
    changed[:, 0] += 1.0  # the top-left patch's pixels
    abstract = jax.eval_shape(enc.init, jax.random.key(0), patches)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
                                     ).astype(np.float32), nn.unbox(abstract))
    out, out_changed = jax.jit(lambda x: [enc.apply(params, v) for v in x])((patches, changed))
    return enc, abstract, out, out_changed, patches, params


def test_encoder_gives_one_embedding_per_patch_and_depends_on_its_pixels(encoder):
    _, params, out, out_changed, _, _ = encoder
    assert out.shape == (8, GRID * GRID, _config().model.emb_dim)
    names = set(params["params"])
    assert {"stem", "stage0_block0", "stage1_block0", "to_embed"} <= names and "stage2_block0" not in names
    # The grid is spatial: the top-left cell moves, the far corner's receptive field
    # does not reach the change.
    delta = np.abs(np.asarray(out_changed - out)).sum(-1)[0]
    assert delta[0] > 0 and delta[-1] == 0


@pytest.fixture(scope="module")
def runs(devices, encoder):
    """Encoder output and its parameters on 1 device and on data=2 x fsdp=4, the
    parameters placed by their logical axes through the rules table."""
    enc, boxed, _, _, patches, values = encoder
    out = {}
    for name, mesh_shape, n in (("one", dict(data=1), 1), ("fsdp", dict(data=2, fsdp=4), 8)):
        mesh = sharding.make_mesh(_config(**mesh_shape).mesh, devices[:n])
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                                sharding.LOGICAL_AXIS_RULES)
        params = jax.device_put(values, shardings)
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES), jax.set_mesh(mesh):
            x = jax.device_put(patches, sharding.batch_sharding(mesh))
            out[name] = (np.asarray(jax.jit(enc.apply)(params, x)), params["params"])
    return out


def test_resnet_features_are_the_same_on_one_device_and_an_fsdp_mesh(runs, encoder):
    np.testing.assert_allclose(runs["fsdp"][0], runs["one"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs["one"][0], encoder[2], rtol=1e-5, atol=1e-5)


def test_resnet_kernels_shard_their_output_channels_over_fsdp(runs):
    params = runs["fsdp"][1]
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    # Every conv kernel is split 4 ways on its output channels; only norms stay whole.
    kernel = params["stage1_block0"]["conv1"]["kernel"]
    assert kernel.shape == (3, 3, 8, 16)
    assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 8, 4)}
    assert sharding.per_device_bytes(params) < 0.3 * total
    assert sharding.per_device_bytes(runs["one"][1]) == total
