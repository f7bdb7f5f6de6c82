"""The quality benchmark's image measures against scikit-image's, and their edge cases."""
from __future__ import annotations

import math

import pytest
import torch

from efficient_attention_pop.benchmark.metrics import PSNR_CAP_DB, cosine, psnr_db, relative_l2, ssim


def images(seed, shape=(3, 3, 40, 48)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = images(0), images(1)
    b = (0.6 * a + 0.4 * b)  # correlated, so the value is far from 0 and 1
    ours = ssim(a, b)
    for i in range(a.shape[0]):
        theirs = metrics.structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=0, data_range=1.0,
                                               gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert math.isclose(float(ours[i]), theirs, abs_tol=1e-5)


def test_ssim_and_psnr_of_identical_and_opposite_images():
    a = images(2)
    assert torch.allclose(ssim(a, a), torch.ones(3)) and torch.equal(psnr_db(a, a), torch.full((3,), PSNR_CAP_DB))
    assert (ssim(a, 1 - a) < 0).all()
    assert torch.allclose(psnr_db(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.1)), torch.tensor([20.0]))


def test_cosine_and_relative_l2():
    a = torch.randn(100, generator=torch.Generator().manual_seed(3))
    assert math.isclose(cosine(a, 2 * a), 1.0, abs_tol=1e-12) and math.isclose(cosine(a, -a), -1.0, abs_tol=1e-12)
    assert math.isclose(relative_l2(1.1 * a, a), 0.1, rel_tol=1e-6)  # 1.1 * a rounds to fp32
    assert relative_l2(torch.zeros(3), torch.zeros(3)) == 0.0 and cosine(torch.zeros(3), torch.zeros(3)) == 1.0
