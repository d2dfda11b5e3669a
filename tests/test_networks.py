"""The deep-image-prior skip generator: shapes for odd sizes, 2D and 3D, and its initial output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dipreg.networks
from dipreg.networks import NATIVE_CONV3D_LIMIT, PaddedConv, SkipGenerator, conv3d_by_depth_taps


@pytest.mark.parametrize("shape", [(37, 51), (19, 23, 17), (16, 16), (2, 3)])
def test_output_has_input_spatial_size(shape: tuple[int, ...]) -> None:
    """Odd, even and tiny sizes come back at the input's size, with one channel per field component."""
    torch.manual_seed(0)
    ndim = len(shape)
    levels = 3 if min(shape) > 8 else 1
    net = SkipGenerator(ndim, 8, ndim, [8] * levels, skip_channels=4)
    out = net(torch.randn(1, 8, *shape))
    assert out.shape == (1, ndim, *shape)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("batchnorm, upsample_mode, skip_channels", [(False, "nearest", 4), (True, "linear", 0),
                                                                     (True, "linear", [2, 3, 4])])
def test_variants_keep_size(ndim: int, batchnorm: bool, upsample_mode: str, skip_channels) -> None:
    """Without BatchNorm, with nearest upsampling, without skips or with per-level skips."""
    shape = (37, 51) if ndim == 2 else (19, 23, 17)
    net = SkipGenerator(ndim, 4, ndim, [6, 6, 6], skip_channels=skip_channels, batchnorm=batchnorm,
                        upsample_mode=upsample_mode)
    assert net(torch.randn(1, 4, *shape)).shape == (1, ndim, *shape)


@pytest.mark.parametrize("shape", [(37, 51), (19, 23, 17)])
def test_small_init_gives_near_identity_field(shape: tuple[int, ...]) -> None:
    """With init_std = 0.01 the output (mm) is far below a voxel.

    The head is a 1x1 convolution with weights N(0, s^2) over C channels of BatchNorm-ed,
    LeakyReLU-ed activations (second moment <= 1), so the output's standard deviation is
    about sqrt(C) * s at most: 0.028 for C = 8, s = 0.01 (bound with a factor 2 of slack).
    """
    torch.manual_seed(0)
    ndim, channels, init_std = len(shape), 8, 0.01
    net = SkipGenerator(ndim, 8, ndim, [channels] * 3, init_std=init_std)
    out = net(0.1 * torch.randn(1, 8, *shape))
    assert out.std().item() < 2 * math.sqrt(channels) * init_std
    assert out.abs().max().item() < 0.25


def test_output_scales_with_init_std() -> None:
    """Ten times the initial weights give a clearly larger initial field (the bound above is not vacuous)."""
    z = 0.1 * torch.randn(1, 8, 24, 24, generator=torch.Generator().manual_seed(1))
    stds = []
    for init_std in (0.01, 0.1):
        torch.manual_seed(0)
        stds.append(SkipGenerator(2, 8, 2, [8] * 3, init_std=init_std)(z).std().item())
    assert stds[1] > 3 * stds[0]


def test_biases_start_at_zero_and_weights_have_init_std() -> None:
    """reset_parameters draws conv weights from N(0, init_std) and zeroes biases."""
    torch.manual_seed(0)
    net = SkipGenerator(3, 16, 3, [16] * 3, init_std=0.05)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
    assert weights.std().item() == pytest.approx(0.05, rel=0.05)


def test_every_parameter_gets_a_gradient() -> None:
    """The noise-to-field map is differentiable end to end (all branches are used)."""
    torch.manual_seed(0)
    net = SkipGenerator(2, 4, 2, [4, 4], skip_channels=2, init_std=0.1)
    net(torch.randn(1, 4, 17, 19)).square().sum().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert missing == []


def test_padded_conv_falls_back_to_replicate_on_tiny_inputs() -> None:
    """Reflection needs more voxels than the padding; a 1-voxel-wide input still works."""
    conv = PaddedConv(2, 1, 1, kernel_size=3)
    assert conv(torch.randn(1, 1, 1, 5)).shape == (1, 1, 1, 5)


def test_rejects_unsupported_dimension() -> None:
    """Only 2D and 3D fields."""
    with pytest.raises(ValueError, match="spatial_dims"):
        SkipGenerator(1, 4, 1, [4])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(1, 5, 7, 6, 9), (1, 3, 8, 5, 4)])
def test_conv3d_by_depth_taps_equals_conv3d(shape: tuple[int, ...], stride: int) -> None:
    """Output and the gradients of input, weight and bias match torch's 3D convolution."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, shape[1], 3, 3, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    results = []
    for function in (lambda *a: F.conv3d(*a[:3], stride=a[3]), conv3d_by_depth_taps):
        inputs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        out = function(*inputs, stride)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)).sum().backward()
        results.append([out, *(t.grad for t in inputs)])
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected)


def test_padded_conv_on_small_cpu_volumes_matches_the_plain_convolution(monkeypatch) -> None:
    """Below the size where torch falls back to its native 3D kernel, PaddedConv computes the
    convolution by depth taps; the result is the plain convolution of the padded input."""
    calls = []
    monkeypatch.setattr(dipreg.networks, "conv3d_by_depth_taps",
                        lambda *args: calls.append(args) or conv3d_by_depth_taps(*args))
    conv = PaddedConv(3, 4, 6, 3, stride=2)
    x = torch.randn(1, 4, 9, 10, 11)
    assert 4 * 11 * 12 <= NATIVE_CONV3D_LIMIT  # channels x padded depth x padded height
    expected = conv.conv(F.pad(x, [1] * 6, mode="reflect"))
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
