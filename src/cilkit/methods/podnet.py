"""PODNet: pooled outputs distillation and a local similarity classifier.

Douillard, Cord, Ollion, Robert, Valle, "PODNet: Pooled Outputs Distillation for Small-Tasks
Incremental Learning", ECCV 2020. Official code: arthurdouillard/incremental_learning.pytorch.
A signed embedding feeds a classifier with K proxies per class (new proxies imprinted by k-means),
trained with an NCA loss; the previous model's stage maps and embedding are distilled (POD-spatial,
POD-flat); after each task the classifier is finetuned on the class-balanced memory.

    L = L_LSC + sqrt(|C_{1:t}| / |C_t|) * (lambda_c L_spatial + lambda_f L_flat)

The defaults are the paper's method; the official code's departures are options (``flat_loss``,
``nca_compat``/``nca_hinge``, ``similarity``, ``grad_clamp``, the network's ``block_relu``,
``stage_relu``, ``zero_residual``, ``penultimate_map``, and ``finetune_bn``), which the
``papers/podnet-*`` presets select. Losses, options and their sources: docs/methods/podnet.md
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.losses.pod import nca_loss, pod_flat, pod_spatial
from cilkit.methods.base import Method, StageOptimizer
from cilkit.models.backbones import RESIDUAL_BACKBONES, RESNET_OPTIONS
from cilkit.models.heads import LocalSimilarityClassifier, mean_row_norm
from cilkit.schema import param


@dataclass
class PODNetHyper:
    proxies: int = param(10, ge=1)  # K proxies per class (paper Sec. 4; official CIFAR YAML proxy_per_class: 10)
    margin: float = 0.6  # NCA margin delta (official YAML nca.margin: 0.6)
    eta_init: float = param(1.0, gt=0)  # initial learned scale eta (official YAML learned_scaling initial_value: 1.0)
    learn_eta: bool = True  # eta is learned (paper Sec. 3.2; official postprocessor learned_scaling)
    nca_hinge: bool = True  # [recalled] the paper's LSC loss is hinged, [.]_+ (not in docs/spec.md §9); code: off
    eta_margin_grad: bool = False  # [assumption] eta gets no gradient through eta*delta (else eta collapses)
    nca_compat: bool = False  # True: official losses.nca (margin subtracted everywhere = no-op; positive slot zeroed)
    similarity: Literal["cosine", "neg_sq_distance"] = "cosine"  # paper: cosine; code: -||h-theta||^2 = 2cos-2
    lambda_spatial: float = param(3.0, ge=0)  # lambda_c (official CIFAR YAML pod_spatial 3; PyCIL 5; ImageNet 8)
    lambda_flat: float = param(1.0, ge=0)  # lambda_f (official CIFAR YAML pod_flat 1; ImageNet 10)
    flat_loss: Literal["l2", "cosine"] = "l2"  # paper: L2 distance; official code: 1 - cos
    finetune_epochs: int = param(20, ge=0)  # balanced finetuning (official CIFAR YAML finetuning_config.epochs)
    finetune_lr: float = param(0.05, gt=0)  # constant lr (official CIFAR YAML; ImageNet 0.01; PyCIL 0.005)
    finetune_optimizer: StageOptimizer = "sgd"  # official: the run's optimizer, SGD in both YAMLs, whatever train.optimizer is
    # spec §15.3: BatchNorm frozen in the finetuning; "train": the official code finetunes in train mode, so the
    # running statistics are re-estimated on the balanced memory (the backbone is still not stepped)
    finetune_bn: Literal["frozen", "train"] = "frozen"
    grad_clamp: float | None = param(None, gt=0)  # official code clamps every gradient to [-5, 5]; the paper says nothing
    # the ResNet (resnet32, resnet18, resnet18_cifar only; see cilkit.models.backbones); defaults: He et al.'s blocks
    block_relu: bool = True  # False: no ReLU after any residual block (official CIFAR "rebuffi" ResNet-32)
    stage_relu: bool = True  # False: no ReLU after the last block of each stage (official ImageNet resnet18)
    zero_residual: bool = False  # True: each block's last BatchNorm scale starts at 0 (both official networks)
    penultimate_map: bool = False  # True: POD-spatial also distils the last stage's penultimate block (official rebuffi: 4 maps)


def kmeans_proxies(features: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` unit-norm proxies of one class: the k-means centroids of its L2-normalised features.

    scikit-learn's KMeans with a fixed ``random_state``, on one thread (its OpenMP pool is far
    slower on a busy machine for a few hundred points); with fewer than ``k`` samples the centroids
    (the samples themselves) are repeated. Returned on ``features``' device, float32.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x = F.normalize(features.float(), dim=1)
    n = min(k, len(x))
    with threadpool_limits(1):
        km = KMeans(n_clusters=n, n_init=10, random_state=seed).fit(x.cpu().double().numpy())
    centers = torch.from_numpy(km.cluster_centers_).float()
    centers = centers.repeat((k + n - 1) // n, 1)[:k]
    return F.normalize(centers, dim=1).to(features.device)


class PODNet(Method):
    name = "podnet"
    paper = "Douillard et al., PODNet: Pooled Outputs Distillation for Small-Tasks Incremental Learning, ECCV 2020"
    Hyper = PODNetHyper
    memory_use = "required"
    distills = True  # the previous model: its stage maps a_l and embedding h*
    backbone_options: ClassVar[dict] = {"last_relu": False}  # signed, pre-ReLU embedding (official convnet_config)

    @classmethod
    def backbone_kwargs(cls, hp) -> dict:
        """``last_relu=False`` and the ResNet options that differ from He et al.'s (only those, so the
        default network is built exactly as without them)."""
        kw = dict(cls.backbone_options)
        kw.update({k: getattr(hp, k) for k, default in RESNET_OPTIONS.items() if getattr(hp, k) != default})
        return kw

    @classmethod
    def needs_maps(cls, hp) -> bool:
        """POD-spatial distils the stage maps: without them (the MLP) it would be silently 0."""
        return hp.lambda_spatial > 0

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        cls.check_stage_rate("finetune_lr", hp.finetune_optimizer, hp.finetune_lr)
        backbone = cfg.model.backbone
        for k, default in RESNET_OPTIONS.items():
            if getattr(hp, k) != default and backbone not in RESIDUAL_BACKBONES:
                raise ConfigError(f"method_args.{k}", f"'{backbone}' has no residual blocks; {k} applies to "
                                  f"{', '.join(RESIDUAL_BACKBONES)} only: remove it or change model.backbone")

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        net.head = LocalSimilarityClassifier(net.feature_dim, hp.proxies, hp.eta_init, hp.similarity, hp.learn_eta)
        self._clamped: set[int] = set()

    # -- per task -----------------------------------------------------------------------------

    def before_task(self, task: Task) -> None:
        if task.index > 0:
            self.imprint(task)
        if self.hp.grad_clamp is not None:
            self._clamp_gradients(self.hp.grad_clamp)

    @torch.no_grad()
    def imprint(self, task: Task) -> None:
        """New proxies: per new class, K k-means centroids of its normalised features (current model),
        normalised and scaled by the mean norm of the existing proxies."""
        head = self.net.head
        old_norm = mean_row_norm(torch.cat(list(head.blocks[:-1])))
        new = [kmeans_proxies(self.class_features(c), head.proxies, self.ctx.seed) for c in task.classes]
        block = head.blocks[-1]
        block.copy_((torch.cat(new) * old_norm).to(block.dtype))

    def param_groups(self, task: Task) -> list[dict]:
        """Everything but the old proxies (official ``groupwise_factors: old_weights: 0`` drops them)."""
        old = {id(p) for p in self.net.head.blocks[:-1]}
        return [{"params": [p for p in self.net.parameters() if p.requires_grad and id(p) not in old]}]

    def classification_loss(self, yhat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hp = self.hp
        return nca_loss(yhat, y, self.net.head.eta, hp.margin, hp.nca_hinge, hp.eta_margin_grad, hp.nca_compat)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        loss = self.classification_loss(out["logits"], y)
        if self.teacher is None:
            return loss
        old = self.teacher.backbone(x)
        s = math.sqrt(self.task.stop / self.task.n_classes)
        spatial = pod_spatial(old["maps"], out["maps"])
        flat = pod_flat(old["features"], out["features"], self.hp.flat_loss)
        return loss + s * (self.hp.lambda_spatial * spatial + self.hp.lambda_flat * flat)

    def finetune_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_LSC with the backbone fixed (only the proxies move; distillation has no gradient here)."""
        with torch.no_grad():
            h = self.net.backbone(x)["features"]
        return self.classification_loss(self.net.head(h), y)

    def after_task(self, task: Task) -> None:
        """Herding (every class cut to the same quota), then classifier-only balanced finetuning.

        The official code rebuilds the memory again afterwards. With BatchNorm frozen (the default)
        the backbone is untouched by the finetuning and that selection would be the same one; with
        ``finetune_bn: train`` the statistics moved, so the new classes' herding is redone.
        """
        self.update_memory(task)
        if task.index == 0 or self.hp.finetune_epochs <= 0:
            return
        hp = self.hp
        stage = self.extra_stage(task, epochs=hp.finetune_epochs, lr=hp.finetune_lr, optimizer=hp.finetune_optimizer,
                                 schedule="constant")  # the official finetuning sets no scheduler
        # official ``tuning: classifier``: all proxies (old ones included); eta stays as trained
        train_mode = self.net.train if hp.finetune_bn == "train" else None  # None: backbone in eval mode
        self.balanced_finetune(list(self.net.head.blocks), stage, self.finetune_loss, train_mode=train_mode)
        if hp.finetune_bn == "train" and self.memory.selection == "herding":
            self.reselect_new(task)

    def reselect_new(self, task: Task) -> None:
        """The new classes' exemplars chosen again with the model after the finetuning (the official
        ``_after_task_intensive`` rebuild); the old classes keep theirs."""
        for c in task.classes:
            self.memory.exemplars.pop(int(c), None)
        self.update_memory(task)

    # -- the official code's gradient clamp -----------------------------------------------------

    def _clamp_gradients(self, bound: float) -> None:
        for p in self.net.parameters():
            if id(p) not in self._clamped:
                p.register_hook(lambda g: g.clamp(-bound, bound))
                self._clamped.add(id(p))
