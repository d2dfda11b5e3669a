"""The Deep Image Prior "skip" encoder-decoder, for 2D and 3D from one definition."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_cls(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def _batchnorm_cls(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]


#: On the CPU, PyTorch runs a float32 3D convolution of batch 1 with its slow native kernel
#: (instead of oneDNN) when batch x channels x depth x height <= 20480: the deeper levels of
#: a 3D network. There the same convolution as a sum of 2D convolutions is about 4x faster.
NATIVE_CONV3D_LIMIT = 20480


def conv3d_by_depth_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         stride: int, groups: int = 1) -> torch.Tensor:
    """Unpadded 3D convolution of a ``[1, C, D, H, W]`` input computed as 2D convolutions.

    Each depth tap ``k`` of the kernel is a 2D convolution over the input's depth slices
    ``k, k + stride, ...`` taken as a batch; the taps are summed. Equal to
    ``F.conv3d(x, weight, bias, stride, groups=groups)`` up to floating-point rounding.
    """
    taps = weight.shape[2]
    depth_out = (x.shape[2] - taps) // stride + 1
    slices = x[0].transpose(0, 1)  # [D, C, H, W]
    out = None
    for k in range(taps):
        term = F.conv2d(slices[k: k + stride * (depth_out - 1) + 1: stride], weight[:, :, k],
                        bias if k == 0 else None, stride=stride, groups=groups)
        out = term if out is None else out + term
    return out.transpose(0, 1).unsqueeze(0)


class PaddedConv(nn.Module):
    """Convolution with reflection padding (replicate where the input is too small to reflect).

    ``groups`` splits the channels into independent groups (one per ensemble member).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.pad = (kernel_size - 1) // 2
        self.conv = _conv_cls(spatial_dims)(in_channels, out_channels, kernel_size, stride=stride, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            mode = "reflect" if min(x.shape[2:]) > self.pad else "replicate"
            x = F.pad(x, [self.pad] * (2 * (x.dim() - 2)), mode=mode)
        if (x.dim() == 5 and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1
                and x.shape[1] * x.shape[2] * x.shape[3] <= NATIVE_CONV3D_LIMIT):
            return conv3d_by_depth_taps(x, self.conv.weight, self.conv.bias, self.conv.stride[0], self.conv.groups)
        return self.conv(x)


def _conv_block(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int,
                stride: int = 1, batchnorm: bool = True, members: int = 1, dropout: float = 0.0) -> list[nn.Module]:
    """Convolution, BatchNorm, LeakyReLU (then dropout); channel counts are per member (``members`` groups)."""
    layers: list[nn.Module] = [PaddedConv(spatial_dims, members * in_channels, members * out_channels,
                                          kernel_size, stride, groups=members)]
    if batchnorm:
        layers.append(_batchnorm_cls(spatial_dims)(members * out_channels))
    layers.append(nn.LeakyReLU(0.2))
    if dropout:
        layers.append(nn.Dropout(dropout))
    return layers


class _Level(nn.Module):
    """One resolution level: skip branch and (down -> deeper -> up) branch, then merge."""

    def __init__(self, spatial_dims: int, in_channels: int, down: int, up: int, skip: int,
                 deeper: nn.Module | None, deeper_channels: int, batchnorm: bool, upsample_mode: str,
                 members: int = 1, dropout: float = 0.0):
        super().__init__()
        block = dict(batchnorm=batchnorm, members=members, dropout=dropout)
        self.members = members
        self.skip = nn.Sequential(*_conv_block(spatial_dims, in_channels, skip, 1, **block)) if skip else None
        self.down = nn.Sequential(
            *_conv_block(spatial_dims, in_channels, down, 3, stride=2, **block),
            *_conv_block(spatial_dims, down, down, 3, **block),
        )
        self.deeper = deeper
        self.upsample_mode = upsample_mode
        merged = skip + (deeper_channels if deeper is not None else down)
        merge: list[nn.Module] = [_batchnorm_cls(spatial_dims)(members * merged)] if batchnorm else []
        merge += _conv_block(spatial_dims, merged, up, 3, **block)
        merge += _conv_block(spatial_dims, up, up, 1, **block)
        self.merge = nn.Sequential(*merge)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(x)
        if self.deeper is not None:
            y = self.deeper(y)
        mode = self.upsample_mode
        if mode == "linear":
            mode = "bilinear" if x.dim() == 4 else "trilinear"
        y = F.interpolate(y, size=x.shape[2:], mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
        if self.skip is not None:
            y = _cat_per_member(self.skip(x), y, self.members)
        return self.merge(y)


def _cat_per_member(a: torch.Tensor, b: torch.Tensor, members: int) -> torch.Tensor:
    """Concatenate channels member by member: ``[a_0, b_0, a_1, b_1, ...]`` (the groups stay contiguous)."""
    if members == 1:
        return torch.cat([a, b], dim=1)
    split = [t.reshape(t.shape[0], members, t.shape[1] // members, *t.shape[2:]) for t in (a, b)]
    merged = torch.cat(split, dim=2)
    return merged.reshape(a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:])


class SkipGenerator(nn.Module):
    """Deep Image Prior "skip" network (Ulyanov et al.) mapping noise ``z`` to a field.

    Per level: a strided 3x3 convolution down, a 3x3 convolution, BatchNorm and
    LeakyReLU(0.2); a 1x1 skip branch with few channels; linear upsampling; reflection
    padding. Works for any input size (each level upsamples to its input's size).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input noise ``z``.
        out_channels: channels of the output (the field's ``ndim``).
        channels: channels per level (down and up paths), finest level first.
        skip_channels: skip-branch channels per level (a single int applies to all levels).
        batchnorm: use BatchNorm layers.
        upsample_mode: ``linear`` (bi/trilinear) or ``nearest``.
        init_std: standard deviation of the normal initialisation of every weight.
        members: independent networks run as one (an ensemble): every convolution is grouped
            (``groups=members``, all channel counts times ``members``) and BatchNorm normalises
            each member's channels separately. The input is ``[1, members * in_channels, ...]``
            and the output ``[1, members * out_channels, ...]``, member by member; see
            :meth:`stack` to build one from separately initialised networks.
        dropout: probability of (element-wise) dropout after every activation, active whenever
            the module is in training mode (Monte Carlo dropout).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int], skip_channels: int | Sequence[int] = 4,
                 batchnorm: bool = True, upsample_mode: str = "linear", init_std: float = 0.01,
                 members: int = 1, dropout: float = 0.0):
        super().__init__()
        self.members = members
        #: the constructor's arguments but ``members`` (what :meth:`stack` rebuilds from)
        self.arguments = dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                              channels=list(channels), skip_channels=skip_channels, batchnorm=batchnorm,
                              upsample_mode=upsample_mode, init_std=init_std, dropout=dropout)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        skips = [skip_channels] * len(channels) if isinstance(skip_channels, int) else list(skip_channels)
        level_inputs = [in_channels, *channels[:-1]]
        deeper: nn.Module | None = None
        deeper_channels = 0
        for c_in, c, s in reversed(list(zip(level_inputs, channels, skips))):
            deeper = _Level(spatial_dims, c_in, c, c, s, deeper, deeper_channels, batchnorm, upsample_mode, members,
                            dropout)
            deeper_channels = c
        self.body = deeper
        self.head = _conv_cls(spatial_dims)(members * channels[0], members * out_channels, 1, groups=members)
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float) -> None:
        """Draw every convolution weight from N(0, init_std) and zero the biases."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.normal_(module.weight, 0.0, init_std)
                nn.init.zeros_(module.bias)

    @classmethod
    def stack(cls, networks: Sequence["SkipGenerator"]) -> "SkipGenerator":
        """One grouped network computing every one of ``networks`` (same architecture, one member
        each) at once: member ``m`` has network ``m``'s weights, BatchNorm parameters and statistics."""
        members = len(networks)
        if any(network.members != 1 or network.arguments != networks[0].arguments for network in networks):
            raise ValueError("stack: the networks must share one architecture and have one member each")
        sources = [network.state_dict() for network in networks]
        state = {name: value if value.dim() == 0 else torch.cat([source[name] for source in sources])
                 for name, value in sources[0].items()}
        with torch.device("meta"):
            stacked = cls(**{**networks[0].arguments, "members": members})
        stacked.load_state_dict(state, assign=True)
        return stacked

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(z))
