"""Similarity losses and the diffusion and bending-energy regularisers against values derived by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dipreg.losses import (
    SIMILARITY_LOSSES,
    LocalNCC,
    bending_energy,
    diffusion,
    joint_histogram,
    lncc,
    mae,
    mse,
    mutual_information,
    ncc,
    normalized_mutual_information,
    similarity_loss,
)


def as_tensor(array) -> torch.Tensor:
    """A ``[1, 1, *spatial]`` float64 tensor."""
    return torch.as_tensor(np.asarray(array, dtype=np.float64))[None, None]


FIXED = [[0.0, 1.0], [2.0, 3.0]]
WARPED = [[1.0, 1.0], [0.0, 3.0]]  # differences 1, 0, -2, 0


def test_mae_of_known_arrays() -> None:
    """(1 + 0 + 2 + 0) / 4."""
    assert mae(as_tensor(FIXED), as_tensor(WARPED)).item() == pytest.approx(0.75)


def test_mse_of_known_arrays() -> None:
    """(1 + 0 + 4 + 0) / 4."""
    assert mse(as_tensor(FIXED), as_tensor(WARPED)).item() == pytest.approx(1.25)


@pytest.mark.parametrize("scale, offset, expected",
                         [(1.0, 0.0, 0.0), (3.0, -1.0, 0.0), (-1.0, 0.0, 2.0), (-0.5, 2.0, 2.0)])
def test_ncc_of_affine_intensity_copies(scale: float, offset: float, expected: float, rng: np.random.Generator) -> None:
    """Global NCC loss: 0 for a positive affine copy, 2 for a negated one."""
    image = as_tensor(rng.random((16, 16)))
    assert ncc(image, scale * image + offset).item() == pytest.approx(expected, abs=1e-6)


def test_ncc_of_uncorrelated_images_is_one() -> None:
    """Two images with zero covariance: loss 1 - 0."""
    a = as_tensor([[1.0, -1.0], [1.0, -1.0]])
    b = as_tensor([[1.0, 1.0], [-1.0, -1.0]])
    assert ncc(a, b).item() == pytest.approx(1.0)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("scale, offset", [(2.0, -0.5), (0.5, 0.3)])
def test_lncc_of_affine_intensity_copy_is_near_zero(ndim: int, scale: float, offset: float,
                                                    rng: np.random.Generator) -> None:
    """Local NCC of white noise with ``scale * noise + offset``: every window correlates perfectly.

    Only the stabiliser eps = 1e-5 keeps it from 0: with local variances of about 1/12 the
    loss is about eps / (scale^2 / 144) < 0.01.
    """
    image = as_tensor(rng.random((24,) * ndim))
    assert lncc(image, scale * image + offset).item() < 0.01


def test_lncc_of_independent_noise_is_near_one(rng: np.random.Generator) -> None:
    """Independent images: squared local correlations of 81-voxel windows average about 1/80."""
    a, b = as_tensor(rng.random((48, 48))), as_tensor(rng.random((48, 48)))
    assert lncc(a, b).item() == pytest.approx(1.0, abs=0.05)


def _lncc_reference(fixed: np.ndarray, warped: np.ndarray, window: int, eps: float = 1e-5,
                    mask: np.ndarray | None = None) -> float:
    """Brute-force local NCC: window [i - (w-1)//2, i + w//2] per axis, clipped at the borders;
    with a binary mask only the window's voxels inside it count, and only voxels inside it."""
    low, high = (window - 1) // 2, window // 2
    mask = np.ones(fixed.shape, bool) if mask is None else mask
    values = []
    for index in itertools.product(*[range(n) for n in fixed.shape]):
        if not mask[index]:
            continue
        box = tuple(slice(max(0, i - low), i + high + 1) for i in index)
        inside = mask[box]
        f, w = fixed[box][inside], warped[box][inside]
        cross = (f * w).mean() - f.mean() * w.mean()
        values.append(cross**2 / (f.var() * w.var() + eps))
    return 1.0 - float(np.mean(values))


@pytest.mark.parametrize("shape, window", [((11, 13), 3), ((11, 13), 4), ((11, 13), 9), ((5, 13), 9),
                                           ((4, 6, 7), 3), ((4, 6, 7), 4), ((3, 6, 7), 5)])
def test_lncc_matches_brute_force_windows(shape: tuple[int, ...], window: int, rng: np.random.Generator) -> None:
    """The pooled implementation equals explicit per-voxel windows: odd and even widths, 2D and
    3D, and images thinner than the window (the window then spans the whole axis)."""
    fixed = rng.random(shape)
    warped = 0.5 * fixed + 0.3 * rng.random(shape)
    expected = _lncc_reference(fixed, warped, window)
    assert lncc(as_tensor(fixed), as_tensor(warped), window=window).item() == pytest.approx(expected, rel=1e-9)


def test_local_ncc_reuses_fixed_statistics_only_for_the_same_fixed_tensor(rng: np.random.Generator) -> None:
    """A LocalNCC called with a new fixed tensor, or the same one modified in place, recomputes;
    the gradient through the cached path equals the uncached one."""
    loss = LocalNCC(window=5)
    a, b = as_tensor(rng.random((20, 24))), as_tensor(rng.random((20, 24)))
    warped = (0.5 * a + 0.1 * b).requires_grad_(True)
    first = loss(a, warped)
    first.backward()
    cached_grad = warped.grad.clone()
    warped.grad = None
    again = loss(a, warped)
    again.backward()
    assert again.item() == first.item()
    torch.testing.assert_close(warped.grad, cached_grad)
    assert loss(b, warped).item() == pytest.approx(lncc(b, warped, window=5).item(), rel=1e-12)
    b.mul_(2.0).add_(a)
    assert loss(b, warped).item() == pytest.approx(lncc(b, warped, window=5).item(), rel=1e-12)


def _linear_field(shape: tuple[int, ...], spacing: tuple[float, ...], array_axis: int, slope: float) -> torch.Tensor:
    """Every component equal to ``slope * (position in mm along array_axis)``."""
    ndim = len(shape)
    step = spacing[ndim - 1 - array_axis]  # spacing is in (x, y[, z]) order
    position = torch.arange(shape[array_axis], dtype=torch.float64) * step
    view = [1] * ndim
    view[array_axis] = -1
    return (slope * position.view(*view)).expand(*shape)[None, None].expand(1, ndim, *shape).contiguous()


@pytest.mark.parametrize("shape, spacing", [((6, 7), (1.0, 1.0)), ((6, 7), (0.5, 2.0)), ((4, 5, 6), (1.5, 0.8, 2.5))])
def test_diffusion_of_linear_field(shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    """u_c = a * x (x in mm along one axis): every component has gradient a along that axis only.

    The regulariser is the mean over axes of the mean squared difference quotient, so it is
    (a^2 from one axis + 0 from the others) / ndim, whatever the spacing.
    """
    ndim = len(shape)
    slope = 0.3
    for axis in range(ndim):
        field = _linear_field(shape, spacing, axis, slope)
        assert diffusion(field, spacing).item() == pytest.approx(slope**2 / ndim, rel=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (2.0, 0.5)])
def test_diffusion_divides_differences_by_spacing(spacing: tuple[float, float]) -> None:
    """A field rising 1 mm per voxel along x has gradient 1/sx: loss (1/sx)^2 / 2."""
    shape = (5, 6)
    field = torch.arange(shape[1], dtype=torch.float64).expand(1, 2, *shape).contiguous()
    assert diffusion(field, spacing).item() == pytest.approx((1.0 / spacing[0]) ** 2 / 2)


def test_diffusion_of_constant_field_is_zero() -> None:
    """Translations are not penalised."""
    assert diffusion(torch.full((1, 3, 4, 5, 6), 2.5), (1.0, 2.0, 3.0)).item() == 0.0


@pytest.mark.parametrize("name, function", [("mae", mae), ("mse", mse), ("ncc", ncc)])
def test_similarity_loss_lookup(name: str, function, rng: np.random.Generator) -> None:
    """Names map to the functions of this module."""
    a, b = as_tensor(rng.random((8, 8))), as_tensor(rng.random((8, 8)))
    assert similarity_loss(name)(a, b).item() == function(a, b).item()


def test_similarity_loss_lncc_uses_window(rng: np.random.Generator) -> None:
    """The lncc window option is passed through."""
    a, b = as_tensor(rng.random((12, 12))), as_tensor(rng.random((12, 12)))
    assert similarity_loss("lncc", lncc_window=3)(a, b).item() == lncc(a, b, window=3).item()
    assert similarity_loss("lncc", lncc_window=3)(a, b).item() != lncc(a, b, window=5).item()


def test_unknown_similarity_loss_is_rejected() -> None:
    """A typo names the valid choices."""
    with pytest.raises(ValueError, match="mae, mse, ncc, lncc, mi, nmi"):
        similarity_loss("mind")


# -- masks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(set(SIMILARITY_LOSSES) - {"lncc"}))
def test_binary_mask_equals_the_loss_of_the_voxels_inside(name: str, rng: np.random.Generator) -> None:
    """For a pointwise or global loss, a 0/1 mask is the same as dropping the voxels outside it."""
    fixed, warped = rng.random((12, 14)), rng.random((12, 14))
    warped[:6] = 0.7 * fixed[:6] ** 2 + 0.1  # a dependence inside the mask only
    mask = np.zeros((12, 14), bool)
    mask[:6] = True
    loss = similarity_loss(name)
    masked = loss(as_tensor(fixed), as_tensor(warped), as_tensor(mask)).item()
    assert masked == pytest.approx(loss(as_tensor(fixed[:6]), as_tensor(warped[:6])).item(), rel=1e-9)
    assert masked != pytest.approx(loss(as_tensor(fixed), as_tensor(warped)).item(), rel=1e-3)


@pytest.mark.parametrize("name", sorted(SIMILARITY_LOSSES))
def test_mask_of_ones_changes_nothing(name: str, rng: np.random.Generator) -> None:
    fixed, warped = as_tensor(rng.random((10, 11))), as_tensor(rng.random((10, 11)))
    loss = similarity_loss(name, lncc_window=5)
    assert loss(fixed, warped, torch.ones_like(fixed)).item() == pytest.approx(loss(fixed, warped).item(), rel=1e-9)


@pytest.mark.parametrize("shape, window", [((11, 13), 3), ((11, 13), 4), ((4, 6, 7), 3)])
def test_masked_lncc_matches_brute_force_windows(shape: tuple[int, ...], window: int,
                                                 rng: np.random.Generator) -> None:
    """LNCC with a mask counts only the masked voxels of every window, over masked voxels."""
    fixed = rng.random(shape)
    warped = 0.5 * fixed + 0.3 * rng.random(shape)
    mask = rng.random(shape) > 0.3
    expected = _lncc_reference(fixed, warped, window, mask=mask)
    assert lncc(as_tensor(fixed), as_tensor(warped), window=window, mask=as_tensor(mask)).item() == pytest.approx(
        expected, rel=1e-6)


# -- mutual information ----------------------------------------------------------------------


def test_mutual_information_of_separated_levels_matches_scikit_learn(rng: np.random.Generator) -> None:
    """Images with four intensity levels far apart (more than the kernel's 4-bin support): the
    Parzen window smears each level but cannot mix them, so the MI is that of the discrete
    labels, as scikit-learn's ``mutual_info_score`` (nats) computes it (the kernel's own entropy
    cancels in MI, not in NMI: that is checked against the reference histogram below)."""
    from sklearn.metrics import mutual_info_score

    fixed_labels = rng.integers(0, 4, (20, 30))
    moving_labels = np.where(rng.random((20, 30)) < 0.7, (fixed_labels * 3) % 4, rng.integers(0, 4, (20, 30)))
    value = mutual_information(as_tensor(fixed_labels / 3.0), as_tensor(moving_labels / 3.0)).item()
    expected = mutual_info_score(fixed_labels.ravel(), moving_labels.ravel())
    assert -value == pytest.approx(expected, rel=1e-9)


def _parzen_joint_reference(fixed: np.ndarray, warped: np.ndarray, weight: np.ndarray, bins: int) -> np.ndarray:
    """Joint histogram with scipy's cubic B-spline basis element over each image's masked range."""
    from scipy.interpolate import BSpline

    kernel = BSpline.basis_element([-2, -1, 0, 1, 2], extrapolate=False)

    def weights(values: np.ndarray) -> np.ndarray:
        inside = values[weight > 0]
        position = (values - inside.min()) / (inside.max() - inside.min()) * (bins - 5) + 2
        return np.nan_to_num(kernel(position.ravel()[:, None] - np.arange(bins)))

    joint = (weights(fixed) * weight.ravel()[:, None]).T @ weights(warped)
    return joint / joint.sum()


def test_joint_histogram_matches_an_independent_parzen_window(rng: np.random.Generator) -> None:
    """Masked (soft weights) joint histogram against scipy's B-spline basis; MI and NMI from it."""
    fixed, warped = rng.random((9, 10, 11)), rng.random((9, 10, 11)) ** 2
    weight = np.clip(rng.random((9, 10, 11)) * 2 - 0.5, 0, 1)
    expected = _parzen_joint_reference(fixed, warped, weight, bins=16)
    joint = joint_histogram(as_tensor(fixed), as_tensor(warped), as_tensor(weight), bins=16).numpy()
    np.testing.assert_allclose(joint, expected, atol=1e-12)
    pf, pw = expected.sum(1), expected.sum(0)
    nonzero = expected > 0
    mi = (expected[nonzero] * np.log(expected[nonzero] / np.outer(pf, pw)[nonzero])).sum()
    value = mutual_information(as_tensor(fixed), as_tensor(warped), as_tensor(weight), bins=16).item()
    assert -value == pytest.approx(mi, rel=1e-6)

    def entropy(p: np.ndarray) -> float:
        return float(-(p[p > 0] * np.log(p[p > 0])).sum())

    nmi = normalized_mutual_information(as_tensor(fixed), as_tensor(warped), as_tensor(weight), bins=16).item()
    assert 2.0 - nmi == pytest.approx((entropy(pf) + entropy(pw)) / entropy(expected), rel=1e-6)


@pytest.mark.parametrize("loss", [mutual_information, normalized_mutual_information])
def test_mutual_information_gradient_matches_finite_differences(loss, rng: np.random.Generator) -> None:
    """gradcheck on a tiny 6x6 image; the two extreme voxels are held fixed so that the binning
    range (a constant of the loss) does not move under the finite differences."""
    fixed = as_tensor(rng.random((6, 6)))
    interior = torch.tensor(0.2 + 0.6 * rng.random(34), dtype=torch.float64, requires_grad=True)
    mask = as_tensor(rng.random((6, 6)) > 0.2)
    mask[..., 0, :2] = 1.0

    def value(x: torch.Tensor) -> torch.Tensor:
        warped = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), x]).reshape(1, 1, 6, 6)
        return loss(fixed, warped, mask, bins=8)

    assert torch.autograd.gradcheck(value, (interior,), eps=1e-6, atol=1e-6)


def _positions_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[torch.Tensor]:
    """Physical coordinate (mm) along each array axis, broadcast to ``shape``."""
    ndim = len(shape)
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    return [g * spacing[ndim - 1 - axis] for axis, g in enumerate(grids)]


@pytest.mark.parametrize("shape, spacing", [((6, 7), (1.0, 1.0)), ((6, 7), (0.5, 2.0)), ((4, 5, 6), (1.5, 0.8, 2.5))])
def test_bending_energy_of_quadratic_fields(shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    """u = c * p_a^2 in one component: its only second derivative is 2c (energy 4c^2); u = c * p_a * p_b
    (a != b): mixed derivative c, counted twice (energy 2c^2); the other components are zero."""
    c = 0.3
    positions = _positions_mm(shape, spacing)
    field = torch.zeros(1, len(shape), *shape, dtype=torch.float64)
    field[0, 0] = c * positions[-1] ** 2
    assert bending_energy(field, spacing).item() == pytest.approx(4 * c**2, rel=1e-9)
    field[0, 0] = c * positions[0] * positions[-1]
    assert bending_energy(field, spacing).item() == pytest.approx(2 * c**2, rel=1e-9)


def test_bending_energy_does_not_penalise_affine_fields() -> None:
    """Translations and linear maps have no second derivatives (diffusion does penalise the latter)."""
    positions = _positions_mm((4, 5, 6), (1.5, 0.8, 2.5))
    field = torch.stack([2.0 + 0.4 * positions[0] - 0.1 * positions[2], 0.3 * positions[1], -1.0 + 0 * positions[0]])[None]
    assert bending_energy(field, (1.5, 0.8, 2.5)).item() == pytest.approx(0.0, abs=1e-12)
    assert diffusion(field, (1.5, 0.8, 2.5)).item() > 0
