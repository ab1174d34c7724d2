"""ER-ACE: experience replay with the asymmetric cross-entropy.

L. Caccia, R. Aljundi, N. Asadi, T. Tuytelaars, J. Pineau and E. Belilovsky, "New Insights on Reducing
Abrupt Representation Change in Online Continual Learning", ICLR 2022. Official code: pclucas14/AML
(``methods/er_ace.py``, ``main.py``, ``model.py``); Mammoth's ``models/er_ace.py`` (aimagelab/mammoth).
The incoming batch is trained only against the classes present in it, so that new classes push their
own logits up without pushing the old classes' down; the replay batch is trained against all seen
classes:

    L = CE(z(x_in) restricted to the classes present in the batch, y_in) + CE(z(x_re), y_re)

On the first task, plain CE on the incoming batch. Departures of the reference codes are options:
``open_unseen`` (the logits from the largest seen class on stay unmasked), ``task_free`` (masking and
replay from the first step) and ``classifier: cosine`` (their cosine head, scale 10).
Losses, options and their sources: docs/methods/er-ace.md
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cilkit.errors import ConfigError
from cilkit.methods.er import StreamReplay
from cilkit.models.heads import CosineLinear
from cilkit.schema import param

COSINE_SCALE = 10.0  # the reference codes' distLinear / CustomLinear scale_factor [code]


def present_mask(y: torch.Tensor, n_classes: int, open_from: torch.Tensor | int | None = None) -> torch.Tensor:
    """The columns the incoming loss keeps: the classes present in ``y``, and with ``open_from`` every
    class index >= it (the reference codes' ``mask[:, seen_so_far.max():] = 1``)."""
    keep = torch.zeros(n_classes, dtype=torch.bool, device=y.device)
    keep[y] = True
    if open_from is not None:
        keep |= torch.arange(n_classes, device=y.device) >= open_from
    return keep


def asymmetric_ce(z: torch.Tensor, y: torch.Tensor, open_from: torch.Tensor | int | None = None) -> torch.Tensor:
    """CE of ``z`` over the kept columns only (:func:`present_mask`): the others get no probability mass
    and no gradient. (The reference codes fill them with -1e9; -inf is the exact exclusion.)"""
    keep = present_mask(y, z.shape[1], open_from)
    return F.cross_entropy(z.float().masked_fill(~keep, float("-inf")), y)


@dataclass
class ERACEHyper:
    # exemplars replayed per step; None: the stream batch's size (AML --buffer_batch_size 10 = --batch_size;
    # Mammoth's minibatch_size)
    replay_batch_size: int | None = param(None, ge=1)
    # false: the paper's mask, the classes present in the incoming batch only; true: the reference codes'
    # mask[:, seen_so_far.max():] = 1, which also keeps the largest seen class and every class after it
    # (not-yet-seen classes of a fixed head) [code: AML methods/er_ace.py, Mammoth models/er_ace.py]
    open_unseen: bool = False
    # false: the first task is plain CE without replay, the mask and the replay batch start at the second
    # task (Mammoth's default --task_free 0); true: both from the first step (AML forces task_free for ER-ACE)
    task_free: bool = False
    # linear: the network's head; cosine: the reference codes' cosine classifier, scale 10, no bias
    # (AML model.py distLinear, Mammoth --use_custom_classifier 1, its default)
    classifier: Literal["linear", "cosine"] = "linear"


class ERACE(StreamReplay):
    """Caccia et al., New Insights on Reducing Abrupt Representation Change in Online Continual Learning,
    ICLR 2022: CE of the incoming batch over its own classes plus CE of a memory batch over all seen
    classes. docs/methods/er-ace.md"""

    name = "er-ace"
    paper = ("Caccia, Aljundi, Asadi, Tuytelaars, Pineau & Belilovsky, New Insights on Reducing Abrupt "
             "Representation Change in Online Continual Learning (ER-ACE), ICLR 2022")
    Hyper = ERACEHyper
    fixed_head = True  # with model.head: fixed the mask runs over all N columns and the replay CE over all of them

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        if hp.classifier == "cosine":
            net.head = CosineLinear(net.feature_dim, sigma=COSINE_SCALE, learn_scale=False)
        # the largest class label the stream has shown (the reference codes' seen_so_far.max())
        self.seen_max = torch.tensor(-1, dtype=torch.long)

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        if hp.classifier == "cosine" and cfg.model.head == "fixed":
            raise ConfigError("method_args.classifier", "the cosine classifier replaces the network's head, "
                              "which model.head: fixed sets; use classifier: linear with a fixed head")

    def masking(self) -> bool:
        return self.hp.task_free or self.task.index > 0

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.net(x)["logits"].float()
        open_from = None
        if self.hp.open_unseen:
            self.seen_max = torch.maximum(self.seen_max.to(y.device), y.max())
            open_from = self.seen_max
        if not self.masking():
            return F.cross_entropy(z, y)
        loss = asymmetric_ce(z, y, open_from)
        batch = self.replay(len(y))
        if batch is not None:
            loss = loss + F.cross_entropy(self.net(batch[0])["logits"].float(), batch[1])
        return loss

    def state_dict(self) -> dict:
        return {"seen_max": int(self.seen_max)}

    def load_state_dict(self, state: dict) -> None:
        self.seen_max = torch.tensor(int(state.get("seen_max", -1)), dtype=torch.long)
