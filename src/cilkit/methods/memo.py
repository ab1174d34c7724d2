"""MEMO: Memory-efficient Expandable MOdel.

Da-Wei Zhou, Qi-Wei Wang, Han-Jia Ye, De-Chuan Zhan, "A Model or 603 Exemplars: Towards Memory-Efficient
Class-Incremental Learning", ICLR 2023. Official code: wangkiw/ICLR23-MEMO (also PyCIL's models/memo.py).
The backbone is split into shallow generalized blocks phi_g, shared by every task, and a deep specialized
block; each task appends a new specialized block (a copy of the previous one) and freezes the old ones.
The training is DER's on the cheaper super-feature (a classifier over every block's features plus an
auxiliary classifier on the new block), then the new classifier rows are weight-aligned:

    L = CE(W_t^T [phi_s1(phi_g(x)); ...; phi_st(phi_g(x))], y) + lambda_a CE(H_t^a(phi_st(phi_g(x))), y_a)

The paper's point is the budget: model parameters (4 bytes each) and exemplars (C*H*W bytes each) count
together, so every task records both (``param_counts``, metrics.json). Losses, options, the budget
accounting and their sources: docs/methods/memo.md
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.memory.budget import exemplars_for, memory_cost
from cilkit.methods.base import Method, StageOptimizer
from cilkit.methods.der import DER, align_new_rows, count_params
from cilkit.models.backbones import split_backbone, stage_count
from cilkit.models.expandable import ExpandingLinear, SharedExpandableBackbone
from cilkit.models.network import freeze
from cilkit.schema import param

log = logging.getLogger("cilkit")


@dataclass
class MEMOHyper:
    # The split (paper Sec. 5: shallow layers generalise, deep ones specialise). Official networks
    # (convs/memo_cifar_resnet.py, memo_resnet.py, conv_cifar.py): the last stage is specialized [code].
    specialized_stages: int = param(1, ge=1)
    # Paper: the generalized blocks are learnt in the first task and then shared as they are
    # [recalled]; official code and PyCIL: --train_base (exps/memo.json "train_base": true) keeps
    # training them in every task on D_t U M [code].
    train_shared: bool = False
    train_old_specialized: bool = False  # official "train_adaptive": false: old specialized blocks frozen [code]
    aux_weight: float = param(1.0, ge=0)  # lambda_a; official alpha_aux 1.0, no aux term in the first task [code]
    fc_bias: bool = True  # official SimpleLinear has a bias [code]
    reuse_old_fc: bool = True  # official update_fc copies the old rows onto the old columns [code]
    # After the representation: official weight_align of the new rows after every later task [code];
    # relearn: DER's classifier re-learning on balanced data (the options below), none: neither.
    classifier_stage: Literal["weight_align", "relearn", "none"] = "weight_align"
    relearn_data: Literal["subset", "memory"] = "subset"  # as DER's (docs/methods/der.md)
    relearn_epochs: int = param(30, ge=0)
    relearn_lr: float = param(0.1, gt=0)
    relearn_optimizer: StageOptimizer = "sgd"
    relearn_milestones: list[int] = field(default_factory=lambda: [15])
    relearn_weight_decay: float = param(5e-4, ge=0)
    relearn_T: float = param(5.0, gt=0)


class MEMO(DER):
    """DER's training and classifier stages on a backbone whose shallow stages are shared."""

    name = "memo"
    paper = "Zhou, Wang, Ye, Zhan, A Model or 603 Exemplars: Towards Memory-Efficient Class-Incremental Learning, ICLR 2023"
    Hyper = MEMOHyper
    memory_use = "required"

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        super().check_config(cfg, hp)
        n = stage_count(cfg.model.backbone, cfg.model.widths)
        if n is None:
            raise ConfigError("model.backbone", f"method 'memo' splits the backbone into shallow and deep stages; "
                              f"'{cfg.model.backbone}' has none: use convnet, resnet32, resnet18 or resnet18_cifar")
        if hp.specialized_stages >= n:
            raise ConfigError("method_args.specialized_stages", f"'{cfg.model.backbone}' has {n} stages: at most "
                              f"{n - 1} can be specialized (at least one stays shared), got {hp.specialized_stages}")

    def __init__(self, hp, net, ctx):
        Method.__init__(self, hp, net, ctx)
        generalized, specialized = split_backbone(net.backbone, hp.specialized_stages)
        net.backbone = SharedExpandableBackbone(generalized, specialized)
        net.head = ExpandingLinear(net.feature_dim, bias=hp.fc_bias, reuse_old=hp.reuse_old_fc)
        self.param_counts: list[dict] = []

    # -- structure ---------------------------------------------------------------------------

    @property
    def shared(self) -> nn.Module:
        return self.net.backbone.generalized

    def grow(self, task: Task) -> None:
        """From the second task: phi_g frozen (unless ``train_shared``), the old specialized blocks frozen
        (unless ``train_old_specialized``), a new block phi_st (a copy of phi_s,t-1), the larger classifier
        and a new auxiliary classifier (|C_t| + 1 outputs)."""
        bb = self.net.backbone
        if task.index > 0:
            parts = [(self.shared, self.hp.train_shared)] + [(e, self.hp.train_old_specialized) for e in bb.extractors]
            for module, trainable in parts:
                if trainable:
                    module.requires_grad_(True)
                else:
                    freeze(module)
            bb.expand()
        self.net.head.in_dim = bb.out_dim
        self.net.add_classes(task.n_classes)
        if task.index > 0:
            ref = self.net.head.weight
            aux = nn.Linear(bb.dims[-1], task.n_classes + 1, bias=self.hp.fc_bias)
            self.net.aux_head = aux.to(device=ref.device, dtype=ref.dtype)

    def train_mode(self) -> None:
        """The new block and the heads train; frozen parts stay in eval mode (BatchNorm statistics fixed)."""
        self.net.train()
        if self.task is None or self.task.index == 0:
            return
        if not self.hp.train_shared:
            self.shared.eval()
        if not self.hp.train_old_specialized:
            for e in self.extractors[:-1]:
                e.eval()

    def _warmup(self, task: Task) -> int:
        return 0  # MEMO has no warm-up (DER's official option)

    # -- after training: classifier stage, memory, budget -----------------------------------------

    def after_task(self, task: Task) -> None:
        trained = count_params(self.net, trainable=True)
        if task.index > 0 and self.hp.classifier_stage == "relearn":
            self.relearn(task)  # selects the memory too
        else:
            if task.index > 0 and self.hp.classifier_stage == "weight_align":
                gamma = align_new_rows(self.net.head.weight.data, self.n_old)
                log.info("MEMO: task %d weight aligning gamma %.4f", task.index + 1, gamma)
            self.update_memory(task)
        counts = {"task": task.index, "params_trainable": trained, **self.budget()}
        self.param_counts.append(counts)
        log.info("MEMO: task %d | %d specialized blocks | backbone %d parameters (shared %d + %d specialized), classifier %d "
                 "| %d exemplars | memory %d B model + %d B exemplars = %.2f MB (model = %.0f exemplars; DER would hold %d more "
                 "parameters = %d exemplars)", task.index + 1, counts["specialized_blocks"], counts["params_backbone"],
                 counts["params_shared"], counts["params_specialized"], counts["params_classifier"], counts["exemplars"],
                 counts["model_bytes"], counts["exemplar_bytes"], counts["total_mb"], counts["model_in_exemplars"],
                 counts["params_saved_vs_der"], counts["exemplars_saved_vs_der"])

    def budget(self) -> dict:
        """Parameters (shared, specialized, classifier) and the memory cost in bytes of the backbone's
        float32 parameters and of the uint8 exemplars, as the paper counts them; beside it, what a DER of as
        many tasks (a whole backbone per task) would hold more, in parameters and in exemplars."""
        shared = count_params(self.shared)
        blocks = [count_params(e) for e in self.extractors]
        backbone = shared + sum(blocks)
        exemplars = len(self.memory) if self.memory is not None else 0
        shape = tuple(self.ctx.train_data.images.shape[1:])
        saved = (len(blocks) - 1) * shared  # DER: len(blocks) copies of phi_g
        return {"specialized_blocks": len(blocks), "params_shared": shared, "params_specialized": sum(blocks),
                "params_backbone": backbone, "params_classifier": count_params(self.net.head),
                "params": backbone + count_params(self.net.head), "exemplars": exemplars,
                **memory_cost(backbone, exemplars, shape),
                "params_saved_vs_der": saved, "exemplars_saved_vs_der": exemplars_for(saved, shape)}

    def task_metrics(self) -> dict:
        """The task's parameters and memory cost (metrics.json, with every task's record)."""
        last = self.param_counts[-1]
        return {"parameters": last["params"], "parameters_backbone": last["params_backbone"],
                "parameters_shared": last["params_shared"], "parameters_specialized": last["params_specialized"],
                "parameters_trained": last["params_trainable"], "specialized_blocks": last["specialized_blocks"],
                "exemplars": last["exemplars"], "model_bytes": last["model_bytes"], "exemplar_bytes": last["exemplar_bytes"],
                "memory_bytes": last["total_bytes"], "memory_mb": last["total_mb"],
                "model_in_exemplars": last["model_in_exemplars"], "exemplars_saved_vs_der": last["exemplars_saved_vs_der"]}
