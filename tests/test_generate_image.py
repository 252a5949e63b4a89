"""generate.py --image and --show_input (m6jax.data.images.model_input / save_model_input):
a file is preprocessed as the run's training images were, and shown in pixels."""
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from m6jax.data import images


def _photo(path, background=255):
    """A photo with a red square in its middle (white: a light background)."""
    a = np.full((64, 48, 3), background, np.uint8)
    a[16:48, 12:36] = (220, 30, 30)
    Image.fromarray(a).save(path)


def _data(**kw):
    return ConfigDict(dict(image_size=16, patch_size=4, image_channels=3,
                           image_text_files="captions.jsonl", **kw))


def test_a_photos_run_sees_a_light_photo_as_trained(tmp_path):
    _photo(tmp_path / "p.jpg")
    d = _data()
    trained = images.patchify(images.load_image(str(tmp_path / "p.jpg"), "", 16, 3), 4)
    np.testing.assert_array_equal(images.model_input(str(tmp_path / "p.jpg"), d, "auto"),
                                  trained)
    flipped = images.model_input(str(tmp_path / "p.jpg"), d, "yes")
    # Inverted in pixels: white -> black, whatever the normalisation.
    shown = images.denormalise(flipped.reshape(4, 4, 4, 4, 3).transpose(0, 2, 1, 3, 4)
                               .reshape(16, 16, 3))
    np.testing.assert_allclose(shown[0, 0], 0.0, atol=1e-5)


def test_a_digits_run_inverts_a_light_background(tmp_path):
    Image.fromarray(np.full((32, 32), 230, np.uint8)).save(tmp_path / "d.png")
    d = ConfigDict(dict(image_size=8, patch_size=2, image_channels=1, image_text_files=""))
    patches = images.model_input(str(tmp_path / "d.png"), d, "auto")
    assert patches.max() < 0.2  # 230/255 -> about 0.1 after inversion


def test_show_input_writes_the_photo_in_its_colours(tmp_path):
    # A mid-grey background: in normalised units it would show near black (0.07).
    _photo(tmp_path / "p.png", background=128)
    patches = images.model_input(str(tmp_path / "p.png"), _data(), "auto")
    images.save_model_input(str(tmp_path / "seen.png"), patches[None], _data(), scale=1)
    seen = np.asarray(Image.open(tmp_path / "seen.png"))
    assert seen.shape == (18, 18, 3)
    r, g, b = seen[9, 9].astype(int)  # the centre: red
    assert r > 150 and g < 90 and b < 90, (r, g, b)
    np.testing.assert_allclose(seen[1, 1], 128, atol=3)  # the corner: the grey as it was
