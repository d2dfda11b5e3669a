"""Adam without ``torch.optim``: the update of ``torch.optim.Adam(fused=True)``, by its kernel.

``torch.optim.Adam`` imports ``torch._dynamo`` the first time one is built, about 3.4 s of a
2D registration's start-up on a 2-core CPU (more than ANTs SyN's whole registration). This
calls the same fused kernel (``aten::_fused_adam_``: Kingma & Ba's bias-corrected moments, no
weight decay, no amsgrad) without that import: one operation per step for all of a network's
~100 tensors (0.4 ms a step on one CPU thread, against 4.9 ms for ``torch.optim.Adam``'s foreach
loop). The step count is a tensor on the parameters' device, so a step can be captured in a CUDA
graph.
"""

from __future__ import annotations

from typing import Iterable

import torch


class Adam:
    """Adam over one or more parameter groups, each with its own learning rate ``"lr"``
    (mutable between steps, as in ``torch.optim``: ``group["lr"] /= 2``).

    Args:
        params: tensors, or dicts ``{"params": [...], "lr": ...}`` (a group without ``"lr"``
            gets ``lr``).
        lr: the learning rate.
        betas: decay rates of the first and second moment estimates.
        eps: added to the square root of the second moment.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{**group, "params": list(group["params"]), "lr": group.get("lr", lr)} for group in groups]
        self.betas, self.eps = betas, eps
        first = self.param_groups[0]["params"][0]
        self.steps = torch.zeros((), device=first.device)
        self.exp_avg = [[torch.zeros_like(p) for p in group["params"]] for group in self.param_groups]
        self.exp_avg_sq = [[torch.zeros_like(p) for p in group["params"]] for group in self.param_groups]

    def zero_grad(self) -> None:
        """Drop the gradients (set them to None; the next backward allocates them afresh)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        self.steps += 1
        for group, exp_avg, exp_avg_sq in zip(self.param_groups, self.exp_avg, self.exp_avg_sq):
            live = [k for k, p in enumerate(group["params"]) if p.grad is not None]
            if live:
                params = [group["params"][k] for k in live]
                torch._fused_adam_(params, [p.grad for p in params], [exp_avg[k] for k in live],
                                   [exp_avg_sq[k] for k in live], [], [self.steps] * len(live), lr=group["lr"],
                                   beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0, eps=self.eps,
                                   amsgrad=False, maximize=False)
