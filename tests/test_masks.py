"""The prefix-LM mask makes one stack an encoder over the prefix and a decoder after it."""
import numpy as np

from m6jax.model.masks import prefix_lm_mask


def _mask(image, text, prefix):
    m = prefix_lm_mask(np.array([image], bool), np.array([text], bool), np.array([prefix], bool))
    return np.asarray(m)[0, 0]


def test_target_token_never_sees_a_later_target_token():
    m = _mask([1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0])
    targets = [4, 5, 6]  # sequence positions of the three target tokens
    for q in targets:
        for k in targets:
            assert m[q, k] == (k <= q)


def test_prefix_tokens_see_each_other_and_the_image():
    m = _mask([1, 1], [1, 1, 1, 0], [1, 1, 0, 0])
    prefix = [0, 1, 2, 3]  # two patches, two source tokens
    assert m[np.ix_(prefix, prefix)].all()


def test_prefix_never_sees_targets():
    m = _mask([1], [1, 1, 1, 1], [1, 0, 0, 0])
    assert not m[0:2, 2:].any()


def test_targets_see_whole_prefix():
    m = _mask([1, 1], [1, 1, 1], [1, 0, 0])
    assert m[3:, 0:3].all()


def test_padding_and_missing_image_are_invisible():
    m = _mask([0, 0], [1, 1, 1, 0], [1, 0, 0, 0])
    assert not m[:, [0, 1, 5]].any()
    assert m.any(axis=1).all(), "every query row must see at least one key"
