"""The training step of the stacked grid, written so that CUDA can capture it as one graph.

A paper-protocol run is 12,800 steps of 12 configurations on batches of 8: each step is a few
hundred small kernels (the heads' forward and backward, the loss, one fused AdamW launch per
configuration), so on a GPU the step is bound by launches and host work, not by arithmetic.
`GridStep` removes the host from the step:
- the run's training samples live on the device (float16) and the batch is gathered there from
  an index buffer the sampler fills on the device (`BatchSampler` draws with a device generator);
- the learning rates are device tensors: every configuration's whole schedule is one
  (iters, G) table, and the step reads its row through a step counter that lives on the device,
  so the schedule needs no Python between steps (torch's LambdaLR would write `group["lr"]`);
- AdamW is torch's fused kernel with a tensor lr per group, `capturable` on CUDA (the step
  counts stay on the device);
- the running training loss accumulates on the device; nothing calls `.item()` until an
  evaluation.
On CUDA the body is then captured once as a `torch.cuda.CUDAGraph` and replayed every step.
The capture needs a few eager warm-up steps on a side stream (torch's rule, so that lazily made
state, AdamW's moments, exists before capture); they would change the run, so `capture` saves
the parameters first and puts them back afterwards, and zeroes AdamW's moments and step counts,
which is exactly the state a fresh optimizer starts from. Replays then train from the untouched
start, on the sampler's untouched stream of batches.

The same code runs eagerly on every device (`graph=False`, and always on the CPU): the CPU tests
compare it with the reference loop (torch's AdamW with float learning rates stepped by LambdaLR),
and benchmarks/gpu.py compares graphed with eager on CUDA. torch.compile(mode="reduce-overhead")
would capture graphs too, at the price of a compile per head family and shape; the hand-written
capture adds no compile step and keeps the eager code path the tests pin.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .grid import StackedHeads
from .recipe import Recipe

WARMUP_STEPS = 3  # eager steps before a capture (torch's examples use 3 on a side stream)


def lr_table(lrs: Sequence[float], iters: int, recipe: Recipe,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """(iters, G) float32: row i holds the lr every configuration's step i uses, the values
    LambdaLR gives (`base * factor(i)`, computed in float64, rounded once)."""
    factors = [recipe.lr_factor(float(lr), iters) for lr in lrs]
    rows = [[float(lr) * factor(i) for lr, factor in zip(lrs, factors, strict=True)]
            for i in range(iters)]
    return torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=torch.float32)


class GridStep:
    """One training step of every configuration of `stacked`, on batches of `batch` samples
    gathered from the device-resident `dense` / `labels`. Call `step(indices)` per iteration;
    `running` holds each configuration's summed loss since the last `take_running()`."""

    def __init__(self, stacked: StackedHeads, dense: torch.Tensor, labels: torch.Tensor,
                 classifier: torch.Tensor, scale: float, lrs: Sequence[float],
                 wds: Sequence[float], iters: int, recipe: Recipe, batch: int,
                 eps: float = 1e-8) -> None:
        device = dense.device
        self.stacked, self.dense, self.labels = stacked, dense, labels
        self.classifier, self.scale, self.grid = classifier, float(scale), stacked.size
        self.schedule = lr_table(lrs, iters, recipe, device)
        self.lr = self.schedule[0].clone()  # (G,): group g's lr is the 0-d view lr[g]
        capturable = device.type == "cuda"
        groups = [{"params": list(config.values()), "lr": self.lr[g],
                   "weight_decay": float(wd)}
                  for g, (config, wd) in enumerate(zip(stacked.configs, wds, strict=True))]
        self.optimizer = torch.optim.AdamW(groups, eps=eps, fused=True, capturable=capturable)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.last = torch.full((1,), iters - 1, dtype=torch.long, device=device)
        self.index = torch.zeros(batch, dtype=torch.long, device=device)
        self.running = torch.zeros(self.grid, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _body(self) -> None:
        """Everything a step does, on device tensors only (what the graph holds)."""
        row = torch.minimum(self.counter, self.last)  # past the schedule: its last row
        self.lr.copy_(self.schedule.index_select(0, row).squeeze(0))
        x = self.dense.index_select(0, self.index).float()
        y = self.labels.index_select(0, self.index)
        logits = self.scale * F.normalize(self.stacked(x), dim=-1) @ self.classifier.T
        per_config = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.grid),
                                     reduction="none").view(self.grid, -1).mean(1)
        per_config.sum().backward()
        self.optimizer.step()
        self.running.add_(per_config.detach())
        self.counter.add_(1)

    def step(self, indices: torch.Tensor) -> None:
        """Train every configuration on the samples `indices` (on the device)."""
        self.index.copy_(indices, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            return
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # capturable=True run eagerly: torch warns each call
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            self._body()

    def take_running(self) -> torch.Tensor:
        """The summed per-configuration loss since the last call (a device tensor)."""
        out = self.running.clone()
        self.running.zero_()
        return out

    def capture(self) -> None:
        """Record the step as a CUDA graph without changing the run (see the module's
        docstring). Raises what torch raises when the step cannot be captured; the run is then
        still at its start and can go on eagerly."""
        saved = [p.detach().clone() for p in self.stacked.stacked]
        side = torch.cuda.Stream(device=self.dense.device)
        side.wait_stream(torch.cuda.current_stream(self.dense.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.step(self.index)
            torch.cuda.current_stream(self.dense.device).wait_stream(side)
            self.reset(saved)  # also drops the gradients: the capture allocates its own
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
        except Exception:
            torch.cuda.synchronize(self.dense.device)
            self.reset(saved)
            raise
        self.graph = graph

    @torch.no_grad()
    def reset(self, saved: Sequence[torch.Tensor]) -> None:
        """Back to the start: parameters `saved`, AdamW's moments and step counts zero (a fresh
        optimizer's state), the step counter and running loss zero. In place: a captured graph
        keeps pointing at these tensors."""
        for param, value in zip(self.stacked.stacked, saved, strict=True):
            param.copy_(value)
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()
        self.counter.zero_()
        self.running.zero_()
        self.optimizer.zero_grad(set_to_none=True)
