"""Ensembles of deep image priors: grouped networks, members equal to separate runs, the spread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import dipreg
from dipreg.cli import build_parser
from dipreg.engine import FieldModel, make_config
from dipreg.ensemble import MIN_JACOBIAN, ensemble_spread, member_transforms
from dipreg.errors import DipregError
from dipreg.field_transform import FieldTransform, affine_transform
from dipreg.losses import ncc
from dipreg.memory import estimate_peak_memory, peak_memory_upper_bound
from dipreg.networks import SkipGenerator
from dipreg.synthetic import foreground_mask
from dipreg.transforms import Grid, displacement_image


def _separate_networks(shape: tuple[int, ...], seeds: range) -> tuple[list[SkipGenerator], list[torch.Tensor]]:
    ndim = len(shape)
    networks, inputs = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        networks.append(SkipGenerator(ndim, 4, ndim, [6, 6], skip_channels=[2, 3], init_std=0.1))
        inputs.append(torch.randn(1, 4, *shape))
    return networks, inputs


@pytest.mark.parametrize("shape", [(20, 18), (10, 12, 9)])
def test_stacked_network_computes_each_member_and_its_gradient(shape: tuple[int, ...]) -> None:
    """One grouped network equals the separate networks: outputs and every weight's gradient
    (BatchNorm in training mode, so its statistics must stay per member). 3D includes the
    depth-tap convolution path. Float32 rounding differs between grouped and plain kernels:
    tolerance 1e-5 of the largest output and of the largest gradient entry."""
    networks, inputs = _separate_networks(shape, range(3))
    stacked = SkipGenerator.stack(networks)
    ndim = len(shape)
    target = torch.randn(3, ndim, *shape, generator=torch.Generator().manual_seed(5))
    out = stacked(torch.cat(inputs, dim=1)).reshape(3, ndim, *shape)
    ((out - target) ** 2).sum().backward()
    separate = [network(z) for network, z in zip(networks, inputs)]
    for member, t in zip(separate, target):
        ((member - t) ** 2).sum().backward()
    expected = torch.cat(separate)
    assert (out - expected).abs().max() < 1e-5 * expected.abs().max()
    stacked_grads, separate_grads = [], []
    for name, parameter in stacked.named_parameters():
        if name.endswith("conv.bias") and "head" not in name:
            continue  # a bias followed by BatchNorm has zero gradient: only rounding noise to compare
        stacked_grads.append(parameter.grad.flatten())
        separate_grads.append(torch.cat([dict(n.named_parameters())[name].grad for n in networks]).flatten())
    stacked_grads, separate_grads = torch.cat(stacked_grads), torch.cat(separate_grads)
    assert (stacked_grads - separate_grads).abs().max() < 1e-5 * separate_grads.abs().max()


def test_stack_refuses_different_architectures() -> None:
    networks, _ = _separate_networks((16, 16), range(1))
    with pytest.raises(ValueError):
        SkipGenerator.stack([networks[0], SkipGenerator(2, 4, 2, [6, 6, 6])])


def test_members_are_initialised_like_single_runs_with_seed_plus_m() -> None:
    """Member m's weights and noise z are those of a single network made after
    torch.manual_seed(seed + m); K = 1 is exactly today's single network."""
    config = make_config(ensemble=3, seed=7, channels=8, input_channels=4)
    model = FieldModel(config, 2, (16, 16))
    for member in range(3):
        single = FieldModel(make_config(seed=7 + member, channels=8, input_channels=4), 2, (16, 16))
        torch.manual_seed(7 + member)
        reference = SkipGenerator(2, 4, 2, [8] * 3, 4, init_std=config.init_std)
        reference_z = torch.randn(1, 4, 16, 16) * config.z_std
        assert torch.equal(single.z, reference_z)
        assert torch.equal(model.z[member:member + 1], reference_z)
        stacked = model.network.state_dict()
        for name, value in reference.state_dict().items():
            assert torch.equal(single.network.state_dict()[name], value)
            if value.dim():
                rows = value.shape[0]
                assert torch.equal(stacked[name][member * rows:(member + 1) * rows], value), name


def test_ncc_is_per_batch_element() -> None:
    """Global NCC of a batch is the mean of each element's NCC (members share no statistics)."""
    g = torch.Generator().manual_seed(0)
    fixed, a, b = (torch.rand(1, 1, 12, 12, generator=g) for _ in range(3))
    batch = ncc(fixed, torch.cat([a, b]))
    assert torch.allclose(batch, (ncc(fixed, a) + ncc(fixed, b)) / 2, atol=1e-6)
    assert ncc(a, a).abs() < 1e-6


@pytest.fixture(scope="module")
def ensemble_runs(brain_slice: sitk.Image) -> dict:
    """A 64 x 64 ensemble of two after one iteration, and the two single runs with its seeds."""
    moving = sitk.Resample(brain_slice, brain_slice, sitk.TranslationTransform(2, (2.0, -1.5)), sitk.sitkLinear)
    options = dict(iterations=1, patience=0, z_mode="fixed", pyramid_levels=1, affine=False, threads=1)
    return {"ensemble": dipreg.register(brain_slice, moving, ensemble=2, seed=3, **options),
            "singles": [dipreg.register(brain_slice, moving, seed=seed, **options) for seed in (3, 4)]}


def test_batched_members_follow_separate_runs_with_the_same_seeds(ensemble_runs: dict) -> None:
    """Each member's velocity field is the single run's with its seed, within 5e-3 of the field's
    size, after one Adam step (measured 3e-5 and 1.4e-3 for the two members). Only the first
    steps can be compared: Adam turns the rounding noise of near-zero gradients (BatchNorm
    scales, biases before BatchNorm) into full learning-rate steps, so a single run with 1 vs 2
    threads differs as much (8e-4 after one step, 4e-2 after two, 30% of the field after
    three); longer runs agree only in distribution."""
    ensemble, singles = ensemble_runs["ensemble"], ensemble_runs["singles"]
    for member, single in zip(ensemble.members, singles):
        got = sitk.GetArrayFromImage(member.deformable)
        expected = sitk.GetArrayFromImage(single.field_transform.deformable)
        assert np.abs(expected).max() > 0.01
        assert np.abs(got - expected).max() < 5e-3 * np.abs(expected).max()
    # the recorded loss is the mean of the members' losses
    mean_loss = np.mean([s.loss_history for s in singles], axis=0)
    np.testing.assert_allclose(ensemble.loss_history, mean_loss, rtol=1e-5)


def test_result_is_the_log_euclidean_mean_and_its_spread(ensemble_runs: dict, tmp_path: Path) -> None:
    """The written field is exp of the members' mean velocity; uncertainty.nii.gz is, per voxel,
    sqrt(trace(cov)) of the members' dense displacements, computed here directly with numpy."""
    result = ensemble_runs["ensemble"]
    velocities = np.stack([sitk.GetArrayFromImage(m.deformable) for m in result.members])
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.field_transform.deformable), velocities.mean(axis=0),
                               atol=1e-6)
    displacements = np.stack([sitk.GetArrayFromImage(m.displacement_image()) for m in result.members])
    expected = np.sqrt(displacements.var(axis=0, ddof=1).sum(axis=-1))
    assert expected.max() > 1e-3  # the members differ
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.uncertainty), expected, atol=1e-5)
    assert Grid.from_image(result.uncertainty) == Grid.from_image(result.fixed)
    foreground = sitk.GetArrayFromImage(foreground_mask(result.fixed)) != 0
    assert result.metrics["uncertainty_mean_mm"] == pytest.approx(expected.mean(), rel=1e-5)
    assert result.metrics["uncertainty_foreground_mean_mm"] == pytest.approx(expected[foreground].mean(), rel=1e-5)
    assert result.metrics["ensemble"] == 2
    result.save(tmp_path / "out")
    saved = sitk.ReadImage(str(tmp_path / "out" / "uncertainty.nii.gz"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(saved), expected, atol=1e-5)
    assert (tmp_path / "out" / "uncertainty_log_jacobian.nii.gz").exists()


def test_uncertainty_inside_the_fixed_labels(ensemble_runs: dict, brain_slice: sitk.Image) -> None:
    result = ensemble_runs["ensemble"]
    labels = sitk.Cast(brain_slice > float(np.percentile(sitk.GetArrayViewFromImage(brain_slice), 70)), sitk.sitkUInt8)
    result.propagate_labels(labels, labels)
    inside = sitk.GetArrayFromImage(labels) != 0
    expected = sitk.GetArrayFromImage(result.uncertainty)[inside].mean()
    assert result.metrics["uncertainty_labels_mean_mm"] == pytest.approx(expected, rel=1e-6)


def test_single_run_has_no_uncertainty(ensemble_runs: dict, tmp_path: Path) -> None:
    single = ensemble_runs["singles"][0]
    assert single.uncertainty is None and single.members == []
    assert "uncertainty_mean_mm" not in single.metrics
    single.save(tmp_path / "single")
    assert not (tmp_path / "single" / "uncertainty.nii.gz").exists()


def test_spread_of_translations_is_analytic() -> None:
    """Members that are constant displacements c_k after an affine stage A: every member's
    displacement is A(p + c_k) - p, so the spread is sqrt(trace(A cov(c) A^T)) everywhere and
    log det J does not vary (det J = det A for every member)."""
    grid = Grid((12, 10), (1.5, 0.7), (3.0, -2.0), (0.8, -0.6, 0.6, 0.8))
    matrix = np.array([[1.1, 0.2], [-0.1, 0.9]])
    offsets = np.array([[1.0, -0.5], [0.2, 0.4], [-0.7, 1.3]])
    combined = FieldTransform(grid, affine_transform(matrix, np.array([0.5, -1.0])),
                              displacement_image(np.zeros((2, 10, 12)), grid), "displacement")
    fields = torch.from_numpy(np.broadcast_to(offsets[:, :, None, None], (3, 2, 10, 12)).copy())
    spread = ensemble_spread(member_transforms(combined, fields))
    expected = np.sqrt(np.trace(matrix @ np.cov(offsets.T, ddof=1) @ matrix.T))
    np.testing.assert_allclose(sitk.GetArrayFromImage(spread.displacement_std), expected, rtol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(spread.log_jacobian_std), 0.0, atol=1e-5)
    assert Grid.from_image(spread.displacement_std) == grid


def test_spread_of_log_jacobian_is_analytic() -> None:
    """Members that scale about the origin by s_k (displacement (s_k - 1) p) have det J = s_k^2
    in 2D, so the log det J spread is the std of 2 log s_k."""
    grid = Grid((9, 8), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    scales = np.array([0.9, 1.0, 1.2])
    points = np.stack(np.meshgrid(np.arange(8.0), np.arange(9.0), indexing="ij")[::-1])  # x, y per voxel [2, 8, 9]
    fields = torch.from_numpy(np.stack([(s - 1.0) * points for s in scales]))
    combined = FieldTransform(grid, affine_transform(np.eye(2), np.zeros(2)),
                              displacement_image(np.zeros((2, 8, 9)), grid), "displacement")
    spread = ensemble_spread(member_transforms(combined, fields))
    np.testing.assert_allclose(sitk.GetArrayFromImage(spread.log_jacobian_std), np.std(2 * np.log(scales), ddof=1),
                               rtol=1e-5)
    assert MIN_JACOBIAN < scales.min() ** 2


def test_ensemble_option_is_validated_and_on_the_command_line() -> None:
    with pytest.raises(DipregError, match="ensemble"):
        make_config("classic", ensemble=2)
    with pytest.raises(DipregError, match="ensemble"):
        make_config(ensemble=0)
    args = build_parser().parse_args(["register", "f.nii", "m.nii", "-o", "out", "--ensemble", "4"])
    assert args.ensemble == 4


@pytest.mark.parametrize("shape", [(256, 256), (96, 112, 80)])
def test_memory_estimates_grow_with_the_ensemble(shape: tuple[int, ...]) -> None:
    """K members hold K times the network's activations and weights: the estimate and its
    quick bound grow, and the bound stays above the traced estimate."""
    single, four = make_config(), make_config(ensemble=4)
    assert estimate_peak_memory(shape, four) > estimate_peak_memory(shape, single) + 1e6
    assert peak_memory_upper_bound(shape, four) >= estimate_peak_memory(shape, four)
    assert peak_memory_upper_bound(shape, four) > peak_memory_upper_bound(shape, single)


def test_dropout_members_are_samples_of_one_network() -> None:
    """With dropout the ensemble is one network (a single network's weights) whose K final
    fields are Monte Carlo dropout samples: they differ from each other, and their mean is
    closer to the network's expected output than a single sample is."""
    config = make_config(ensemble=4, dropout=0.2, channels=8, input_channels=4, init_std=0.1)
    model = FieldModel(config, 2, (16, 16))
    single = FieldModel(make_config(channels=8, input_channels=4, init_std=0.1), 2, (16, 16))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in single.parameters())
    torch.manual_seed(1)
    samples = model.final_fields()
    assert samples.shape == (4, 2, 16, 16)
    assert (samples[0] - samples[1]).abs().max() > 1e-3 * samples.abs().max()
    expected = torch.cat([model.final_fields() for _ in range(50)]).mean(dim=0)
    assert (samples.mean(dim=0) - expected).norm() < (samples[0] - expected).norm()
    with pytest.raises(DipregError, match="dropout"):
        make_config(dropout=1.0)
