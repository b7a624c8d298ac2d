"""The toy domain: determinism, rendering, captions and prompt parsing."""

from __future__ import annotations

import numpy as np
import torch

from emd_t2i.toy import domain


def test_same_seed_same_images_and_captions():
    a, b = domain.make_dataset(64, seed=3), domain.make_dataset(64, seed=3)
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    c = domain.make_dataset(64, seed=4)
    assert not torch.equal(a[0], c[0])


def test_images_are_in_range_and_fit():
    attrs = domain.sample_attributes(2000, seed=0)
    images = domain.render(attrs)
    assert images.shape == (2000, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    # Every shape lies fully inside the image, and is never smaller than the minimum size.
    assert (attrs.cx - attrs.size >= 0).all() and (attrs.cx + attrs.size <= 32).all()
    assert (attrs.size >= domain.MIN_SIZE).all()


def test_pixel_colours_match_the_attributes():
    attrs = domain.sample_attributes(300, seed=1)
    images = (domain.render(attrs) + 1) / 2
    for i in range(len(attrs)):
        centre = images[i, :, int(attrs.cy[i]), int(attrs.cx[i])]
        corner = images[i, :, 0, 0]
        assert centre.tolist() == list(domain.COLOUR_RGB[domain.COLOURS[attrs.colour[i]]])
        assert corner.tolist() == list(domain.BACKGROUND_RGB[domain.BACKGROUNDS[attrs.background[i]]])


def test_shapes_have_their_expected_areas():
    n = 200
    for kind, expected in [(0, np.pi), (1, 4.0), (2, 2.0)]:  # circle pi s^2, square 4 s^2, triangle 2 s^2
        attrs = domain.sample_attributes(n, seed=2, shape=kind)
        area = domain.shape_masks(attrs).sum(axis=(1, 2))
        ratio = area / attrs.size**2
        assert abs(ratio.mean() - expected) < 0.15, (kind, ratio.mean())


def test_prompt_parsing_round_trips_every_caption():
    captions = domain.all_captions()
    assert len(set(captions)) == len(captions) == 3 * 4 * 2 * len(domain.PHRASINGS)
    for s in range(3):
        for c in range(4):
            for b in range(2):
                for p in range(len(domain.PHRASINGS)):
                    assert domain.parse_prompt(domain.caption(s, c, b, p)) == (s, c, b)


def test_parse_prompt_unknown_or_ambiguous_is_none():
    assert domain.parse_prompt("a photo of a cat") == (None, None, None)
    assert domain.parse_prompt("A RED Circle") == (0, 0, None)
    assert domain.parse_prompt("a red and blue square on black") == (1, None, 1)


def test_fixed_attributes_are_respected():
    attrs = domain.sample_attributes(50, seed=0, shape=2, colour=3, background=1)
    assert (attrs.shape == 2).all() and (attrs.colour == 3).all() and (attrs.background == 1).all()
    assert len(set(np.round(attrs.cx, 3))) > 40  # position still random


def test_rendering_is_fast():
    import time

    start = time.perf_counter()
    domain.render(domain.sample_attributes(5000, seed=0))
    assert time.perf_counter() - start < 5.0  # thousands of images per second, even on a busy machine


def test_partial_captions_name_exactly_the_attributes_they_keep():
    for s in (*range(3), None):
        for c in (*range(4), None):
            for b in (0, 1, None):
                for p in range(len(domain.PHRASINGS)):
                    assert domain.parse_prompt(domain.caption(s, c, b, p)) == (s, c, b)
    partial = domain.partial_captions()
    assert len(set(partial)) == len(partial) and not set(partial) & set(domain.all_captions())
    assert {"a shape", "a red shape", "a circle", "a shape on a black background", "a blue square"} <= set(partial)
    # a full triple still reads as before, word for word
    assert domain.caption(0, 0, 0, 0) == "a red circle on a white background"
