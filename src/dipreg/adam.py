"""Adam, written out: the update of ``torch.optim.Adam`` in a few batched (foreach) operations.

``torch.optim.Adam`` imports ``torch._dynamo`` the first time one is built, about 3.4 s of a
2D registration's start-up on a 2-core CPU (more than ANTs SyN's whole registration). This
is the same arithmetic (Kingma & Ba's bias-corrected moments, no weight decay, no amsgrad)
without that import. The step count is a tensor on the parameters' device, so a step can
be captured in a CUDA graph and replayed.
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
        self.steps = torch.zeros((), dtype=torch.float64, device=first.device)
        self.exp_avg = [[torch.zeros_like(p) for p in group["params"]] for group in self.param_groups]
        self.exp_avg_sq = [[torch.zeros_like(p) for p in group["params"]] for group in self.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none=False``: zero them in place)."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        beta1, beta2 = self.betas
        self.steps += 1
        # 1 / (1 - beta1^t) and 1 / sqrt(1 - beta2^t) in float64, as tensors (no host read in a CUDA graph)
        step_scale = 1.0 / (1.0 - torch.pow(beta1, self.steps))
        second_scale = torch.rsqrt(1.0 - torch.pow(beta2, self.steps))
        for group, exp_avg, exp_avg_sq in zip(self.param_groups, self.exp_avg, self.exp_avg_sq):
            live = [k for k, p in enumerate(group["params"]) if p.grad is not None]
            if not live:
                continue
            params = [group["params"][k] for k in live]
            grads = [params[i].grad for i in range(len(live))]
            m = [exp_avg[k] for k in live]
            v = [exp_avg_sq[k] for k in live]
            torch._foreach_lerp_(m, grads, 1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1.0 - beta2)
            denominator = torch._foreach_sqrt(v)
            torch._foreach_mul_(denominator, second_scale.to(params[0].dtype))
            torch._foreach_add_(denominator, self.eps)
            update = torch._foreach_div(m, denominator)
            torch._foreach_mul_(update, (-group["lr"] * step_scale).to(params[0].dtype))
            torch._foreach_add_(params, update)
