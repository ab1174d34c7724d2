"""GEM: Gradient Episodic Memory.

D. Lopez-Paz and M. Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
Official code: facebookresearch/GradientEpisodicMemory (``model/gem.py``). An episodic memory is
kept for every earlier task; at every step the gradient g of the current batch's loss is compared
with the gradient g_k of the loss on each earlier task's memory, and when some <g, g_k> < 0, g is
replaced by the closest gradient (in L2) that has a non-negative inner product with every g_k
(Sec. 3), found through the dual quadratic program, solved with quadprog through qpsolvers:

    v* = argmin_{v >= gamma} 1/2 v^T (G G^T + eps I) v + g^T G^T v,    g~ = G^T v* + g

with G the matrix whose rows are the g_k (gamma = eps = 0: the paper; the official code uses
gamma = memory_strength = 0.5 and eps = 1e-3). Class-incremental: the loss of task k's memory is
the cross-entropy over all seen classes (no task labels at test); ``outputs: task`` masks every
loss to its own task's classes, as the official code does on CIFAR-100. The optimizer is plain
SGD (no momentum, no weight decay: ``plain_sgd``), so that the step is the projected gradient.

The shared parts of GEM and A-GEM (new-data training batches with the memory riding along, the
split of a batch, the flattening of gradients) are here; A-GEM is ``cilkit.methods.agem``.
Losses, options and their sources: docs/methods/gem.md
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from cilkit.data.scenario import Task
from cilkit.errors import CilkitError, ConfigError
from cilkit.methods.base import Method
from cilkit.schema import param
from cilkit.training.loop import shuffled_batches
from cilkit.training.stage import Stage

Outputs = Literal["seen", "task"]


# -- flat gradients --------------------------------------------------------------------------------


def flatten(grads, params) -> torch.Tensor:
    """One vector of the gradients ``grads`` of ``params`` (zeros for a parameter without a gradient)."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    """The parameters' ``.grad`` as one vector (zeros where ``.grad`` is None)."""
    return flatten([p.grad for p in params], params)


def write_grad(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write the vector ``flat`` back into the parameters' ``.grad`` (created where it was None)."""
    offset = 0
    for p in params:
        n = p.numel()
        piece = flat[offset: offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.copy_(piece)
        offset += n


# -- the projections -------------------------------------------------------------------------------


class ProjectionFailed(CilkitError):
    """The QP solver found no solution of GEM's dual problem."""


def solve_gem_dual(gram: np.ndarray, q: np.ndarray, memory_strength: float = 0.0, eps: float = 0.0) -> np.ndarray:
    """v* of GEM's dual QP: argmin_{v >= memory_strength} 1/2 v^T (gram + eps I) v + q^T v.

    ``gram`` = G G^T and ``q`` = G g (G: the memory gradients as rows, g: the current gradient).
    Solved by quadprog (the official code's solver) through qpsolvers. quadprog needs a positive
    definite matrix: when G G^T is numerically singular (two memory gradients parallel) and
    ``eps`` is 0, a ridge of 1e-10 times its mean diagonal is added, the least that makes it solvable.
    """
    t = gram.shape[0]
    import qpsolvers  # imported here so that cilkit starts without it where GEM is not used

    P = 0.5 * (gram + gram.T) + eps * np.eye(t)
    lb = np.full(t, float(memory_strength))
    for ridge in (0.0, 1e-10 * max(float(np.trace(P)) / t, 1e-30)):
        try:
            v = qpsolvers.solve_qp(P + ridge * np.eye(t), q, lb=lb, solver="quadprog")
        except (qpsolvers.ProblemError, ValueError):  # quadprog: the matrix is not positive definite
            v = None
        if v is not None:
            return v
    raise ProjectionFailed(f"GEM: quadprog found no solution of the dual QP ({t} memory gradients); "
                           "set method_args.eps (the official code uses 1e-3)")


def project_gem(g: torch.Tensor, G: torch.Tensor, memory_strength: float = 0.0, eps: float = 0.0) -> torch.Tensor:
    """GEM's projection (Sec. 3): ``g`` itself when <g, g_k> >= 0 for every row g_k of ``G``,
    else g~ = G^T v* + g with v* from :func:`solve_gem_dual`.

    G G^T and G g (t x t and t numbers) are formed on the tensors' device in float64; only they go
    to the solver, and g~ is formed back on the device.
    """
    Gd, gd = G.double(), g.double()
    dots = Gd @ gd
    if bool((dots >= 0).all()):
        return g
    v = solve_gem_dual((Gd @ Gd.T).cpu().numpy(), dots.cpu().numpy(), memory_strength, eps)
    return (torch.from_numpy(v).to(Gd) @ Gd + gd).to(g.dtype)


# -- the losses --------------------------------------------------------------------------------------


def task_of_classes(task_sizes: list[int], device=None) -> torch.Tensor:
    """The task index of every class (class c of the c-th column)."""
    return torch.repeat_interleave(torch.arange(len(task_sizes), device=device), torch.tensor(task_sizes, device=device))


def own_task_ce(logits: torch.Tensor, y: torch.Tensor, task_of_class: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every sample over the classes of its own task only (the official code's
    masked outputs: the other tasks' logits are excluded). Columns beyond ``task_of_class`` (a fixed
    head's classes not seen yet) belong to no sample's task."""
    task_of_class = task_of_class.to(y.device)
    width = logits.shape[1]
    if width > len(task_of_class):
        task_of_class = torch.cat([task_of_class, task_of_class.new_full((width - len(task_of_class),), -1)])
    own = task_of_class[None, :width] == task_of_class[y][:, None]
    return F.cross_entropy(logits.float().masked_fill(~own, float("-inf")), y)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """Whether autocast is on for ``device_type`` here, and its dtype (to run the memory passes as
    the loop ran the loss)."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4
        if device_type == "cuda":
            return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()


class EpisodicProjection(Method):
    """What GEM and A-GEM share (not a method by itself: it has no name).

    The training set of a task is its new data only; every index batch of new data gets memory
    indices appended (``memory_part``), so that the loop draws and transforms them with the batch.
    ``loss`` returns the loss of the new samples and keeps the memory samples; ``before_step``
    (between the backward pass and the optimizer step) computes their gradients with the current
    model and projects ``.grad`` (``project``). With ``plain_sgd`` (the papers' optimizer) the step is
    the projected gradient times the rate: SGD without momentum and weight decay, which would
    otherwise act after the projection and undo its guarantee.
    """

    memory_use = "required"
    # a stream memory (reservoir, balanced) works too: its exemplars are used as a task-end memory's
    selections = ("herding", "random", "reservoir", "balanced")
    fixed_head = True  # outputs: seen is the CE over every logit; task masks the columns of the sample's own task

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        self._memory_batch: tuple[torch.Tensor, torch.Tensor, tuple[bool, torch.dtype]] | None = None
        self.steps = 0  # steps of the task with memory constraints
        self.projected = 0  # steps of the task whose gradient was projected

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        if hp.plain_sgd and cfg.train.optimizer != "sgd":
            raise ConfigError("train.optimizer", f"method '{cls.name}' steps along the projected gradient with plain SGD "
                              f"(method_args.plain_sgd: true, the papers' optimizer); use sgd, or set "
                              f"method_args.plain_sgd=false to let {cfg.train.optimizer} act on the projected gradient")

    def stage(self, task: Task) -> Stage:
        """The configured stage; with ``plain_sgd``, without momentum and weight decay (every task)."""
        stage = super().stage(task)
        return stage.replace(momentum=0.0, weight_decay=0.0) if self.hp.plain_sgd else stage

    # -- batches ---------------------------------------------------------------------------------

    def train_indices(self, task: Task) -> torch.Tensor:
        """The new data only: the memory enters through the constraints, not the loss."""
        return self.ctx.train_data.indices_of(task.classes)

    def memory_part(self) -> list[torch.Tensor]:
        """The memory indices appended to every batch of the current task (none on the first)."""
        return []

    def epoch_batches(self, indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        plan = shuffled_batches(indices, batch_size)
        if self.n_old == 0 or self.memory is None or len(self.memory) == 0:
            return plan
        return [torch.cat([chunk, *(m.to(chunk.device) for m in self.memory_part())]) for chunk in plan]

    # -- losses ----------------------------------------------------------------------------------

    def ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of the current batch and of the memory: over all seen classes (``seen``),
        or over each sample's own task (``task``)."""
        if self.hp.outputs == "task":
            return own_task_ce(logits, y, task_of_classes(self.net.task_sizes, logits.device))
        return F.cross_entropy(logits.float(), y)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of the new samples; the memory samples of the batch are kept for ``before_step``."""
        self._memory_batch = None
        if self.n_old == 0:
            return self.ce(self.net(x)["logits"], y)
        new = y >= self.n_old
        self._memory_batch = (x[~new].detach(), y[~new], _autocast_state(x.device.type))
        return self.ce(self.net(x[new])["logits"], y[new])

    def trainable(self) -> list[torch.Tensor]:
        """The parameters the optimizer steps (those of ``param_groups``)."""
        return [p for p in self.net.parameters() if p.requires_grad]

    def memory_gradient(self, x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        """The flat gradient of the memory loss on (x, y) with the current model (an extra backward pass)."""
        loss = self.ce(self.net(x)["logits"], y)
        return flatten(torch.autograd.grad(loss, params, allow_unused=True), params)

    # -- the step hook -----------------------------------------------------------------------------

    def before_step(self) -> None:
        """Project the gradient of the new batch against the memory's (nothing on the first task)."""
        batch, self._memory_batch = self._memory_batch, None
        if batch is None or len(batch[1]) == 0:
            return
        x, y, (amp, dtype) = batch
        params = self.trainable()
        g = flat_grad(params)
        with torch.autocast(x.device.type, dtype=dtype, enabled=amp):
            g_new = self.project(g, x, y, params)
        self.steps += 1
        if g_new is not g:
            self.projected += 1
            write_grad(params, g_new)

    def project(self, g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        """The projected gradient; ``g`` itself (the same object) when no constraint is violated."""
        raise NotImplementedError

    # -- bookkeeping -------------------------------------------------------------------------------

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.steps = self.projected = 0

    def task_metrics(self) -> dict:
        """The parameter count, and how many of the task's steps had constraints and were projected."""
        return {**super().task_metrics(), "constrained_steps": self.steps, "projected_steps": self.projected}


# -- GEM ---------------------------------------------------------------------------------------------


@dataclass
class GEMHyper:
    # gamma, the lower bound of the dual variables: 0 is the paper's QP (v >= 0, Sec. 3); the official
    # model/gem.py passes --memory_strength as the bound (run_experiments.sh: 0.5; main.py default 0)
    memory_strength: float = param(0.0, ge=0)
    # added to the diagonal of G G^T: 0 is the paper's QP; official project2cone2 adds 1e-3
    eps: float = param(0.0, ge=0)
    # exemplars of each earlier task per step: None = all of them (the paper's l(f, M_k), Sec. 3;
    # official: the whole per-task buffer every step); a number: a random subset (cilkit, for cost)
    memory_batch_size: int | None = param(None, ge=1)
    # seen: CE over all seen classes (class-incremental; the official single-head MNIST runs);
    # task: each loss over its own task's classes (official CIFAR-100 masking)
    outputs: Outputs = "seen"
    # SGD without momentum and weight decay, so that the step is the projected gradient (official
    # main.py/model/gem.py: optim.SGD(params, lr)); false: the config's optimizer as it is
    plain_sgd: bool = True


class GEM(EpisodicProjection):
    """Lopez-Paz & Ranzato, Gradient Episodic Memory for Continual Learning, NeurIPS 2017.
    One constraint per earlier task, projected by a QP: docs/methods/gem.md."""

    name = "gem"
    paper = "Lopez-Paz & Ranzato, Gradient Episodic Memory for Continual Learning, NeurIPS 2017"
    Hyper = GEMHyper

    def task_memories(self) -> list[torch.Tensor]:
        """The exemplar indices of every earlier task (the memory M_k of task k: its classes' exemplars)."""
        out = []
        for k in range(self.task.index):
            sl = self.net.task_slice(k)
            out.append(self.memory.indices(range(sl.start, sl.stop)))
        return out

    def memory_part(self) -> list[torch.Tensor]:
        n = self.hp.memory_batch_size
        parts = self.task_memories()
        if n is None:
            return parts
        return [m[torch.randperm(len(m))[:n]] for m in parts]

    def project(self, g, x, y, params):
        rows = []
        for k in range(self.task.index):
            sl = self.net.task_slice(k)
            of_k = (y >= sl.start) & (y < sl.stop)
            if bool(of_k.any()):
                rows.append(self.memory_gradient(x[of_k], y[of_k], params))
        if not rows:
            return g
        return project_gem(g, torch.stack(rows), self.hp.memory_strength, self.hp.eps)
