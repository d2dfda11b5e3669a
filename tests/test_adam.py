"""The engine's Adam (the fused kernel called without torch.optim) takes the same steps as ``torch.optim.Adam``."""

from __future__ import annotations

import torch

from dipreg.adam import Adam


def rosenbrock_like(params: list[torch.Tensor]) -> torch.Tensor:
    a, b = params
    return ((1 - a) ** 2).sum() + 10 * ((b - a[:3] ** 2) ** 2).sum()


def run(optimizer_cls, groups_of, steps: int = 60, halve_at: int = 30) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    optimizer = optimizer_cls(groups_of(params), lr=0.05)
    for step in range(steps):
        optimizer.zero_grad()
        rosenbrock_like(params).backward()
        optimizer.step()
        if step == halve_at:
            for group in optimizer.param_groups:
                group["lr"] /= 2
    return [p.detach() for p in params]


def test_single_group_matches_torch_adam() -> None:
    ours = run(Adam, lambda params: params)
    reference = run(lambda p, lr: torch.optim.Adam(p, lr=lr, foreach=True), lambda params: params)
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # and the steps moved the parameters a long way (the comparison is not of two no-ops)
    torch.manual_seed(0)
    start = torch.randn(5)
    assert (ours[0] - start).abs().max() > 0.5


def test_groups_with_their_own_learning_rates_match_torch_adam() -> None:
    def groups(params):
        return [{"params": [params[0]], "lr": 0.01}, {"params": [params[1]]}]

    ours = run(Adam, groups)
    reference = run(lambda g, lr: torch.optim.Adam(g, lr=lr), groups)
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_a_parameter_without_gradient_is_left_alone() -> None:
    used, unused = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    optimizer = Adam([used, unused], lr=0.1)
    (used ** 2).sum().backward()
    optimizer.step()
    # Adam's first step moves every coordinate by lr (sign of the gradient), whatever its size.
    torch.testing.assert_close(used.detach(), torch.full((2,), 0.9))
    torch.testing.assert_close(unused.detach(), torch.ones(2))
