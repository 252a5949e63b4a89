"""The image tokenizer: shapes of codes and images, and the EMA codebook update."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import vq as vq_config
from m6jax.vq.model import VQVAE, ema_update, num_codes


def _tiny():
    c = vq_config.get_config("tiny").vq
    c.update(image_size=16, channels=8, code_dim=8, codebook_size=16)
    return c


def random_variables(model, x, seed=0):
    """Random variables of model's shapes: compiling VQVAE.init (its many RNG calls)
    takes ~30 s on this CPU, which the shapes do not need."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.2, a.shape), a.dtype), shapes)


def test_encode_decode_shapes():
    cfg = _tiny()
    model = VQVAE(cfg)
    x = jax.random.uniform(jax.random.key(0), (3, 16, 16, 1))

    variables = random_variables(model, x)

    @jax.jit  # one compile: eager Flax ops are slow on 8 fake devices
    def run(x):
        codes = model.apply(variables, x, method=VQVAE.tokenize)
        return (model.apply(variables, x), codes,
                model.apply(variables, codes, method=VQVAE.decode))

    (recon, loss, aux), codes, images = run(x)
    assert num_codes(cfg) == 16 and codes.shape == (3, 4, 4) and codes.dtype == jnp.int32
    assert aux["z_e"].shape == (3, 4, 4, 8) and recon.shape == x.shape
    assert images.shape == (3, 16, 16, 1) and 0.0 <= float(images.min()) <= float(images.max()) <= 1.0
    assert int(codes.min()) >= 0 and int(codes.max()) < 16 and np.isfinite(float(loss))


def test_ema_moves_used_codes_to_their_mean_and_restarts_dead_ones():
    vq = dict(codebook=jnp.array([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0]]),
              cluster_size=jnp.array([1.0, 1.0, 0.01]), embed_sum=jnp.array([[0.0, 0.0], [5.0, 5.0], [0.09, 0.09]]))
    z = jnp.array([[2.0, 0.0], [4.0, 0.0]])  # both assigned to code 0
    codes = jnp.array([0, 0])
    new = ema_update(vq, z, codes, jax.random.key(0), decay=0.5, eps=0.0)
    # code 0: size 0.5 * 1 + 0.5 * 2 = 1.5, sum 0.5 * 0 + 0.5 * (6, 0) = (3, 0) -> (2, 0)
    np.testing.assert_allclose(np.asarray(new["codebook"][0]), [2.0, 0.0], atol=1e-6)
    # code 1 unused: size and sum both halve, so it stays at (5, 5)
    np.testing.assert_allclose(np.asarray(new["codebook"][1]), [5.0, 5.0], atol=1e-6)
    # code 2's count (0.005) is below the restart threshold: it jumps onto a batch vector
    assert any(np.allclose(np.asarray(new["codebook"][2]), np.asarray(r)) for r in z)


def test_vq_step_runs_data_parallel_on_the_mesh_with_one_device_numbers(devices):
    """The tokenizer trains like the main model: images split over a `data` mesh (the
    compiled step's activations are one device's quarter of the batch), and two steps
    give the single-device state."""
    import optax

    from m6jax.vq import train as vq_train
    c = vq_config.get_config("tiny")
    c.vq.update(image_size=16, num_downsamples=2, code_dim=8, codebook_size=16)
    c.batch_size = 16
    tx = optax.adam(1e-2)
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 16, 1))
    mesh = vq_train.data_mesh(c.batch_size, devices[:4])
    assert mesh.size == 4 and vq_train.data_mesh(12, devices).size == 4  # gcd(8, 12)
    results = []
    for m in (None, mesh):
        state = vq_train.init_state(c, tx)
        # One compile per step function: the executable run is the one whose HLO is read.
        step = vq_train.make_step(c, tx, m).lower(state, images[0], jax.random.key(0)).compile()
        for i in range(2):
            state, _ = step(state, images[i], jax.random.key(i))
        results.append(jax.device_get(state["params"]))
        if m is not None:
            # The forward's first downsampling convolution: one device's 4 images of 16.
            down = [x for x in step.as_text().splitlines() if "convolution(" in x
                    and "transpose(" not in x and "VQVAE.encode/down_0/conv_general_dilated" in x]
            assert down and all("= f32[4,8,8,16]" in x for x in down), down
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
