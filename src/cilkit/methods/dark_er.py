"""Dark Experience Replay (DER in Buzzega et al.), not Yan et al.'s DER (``der``), and DER++.

P. Buzzega, M. Boschini, A. Porrello, D. Abati and S. Calderara, "Dark Experience for General Continual
Learning: a Strong, Simple Baseline", NeurIPS 2020. Official code: aimagelab/mammoth (``models/der.py``,
``models/derpp.py``, ``utils/buffer.py``, ``utils/best_args.py``). A reservoir memory keeps, for every
stored sample, the logits the network gave it when it was stored (on the augmented stream input); at
every step, on a batch x' of the memory (and for DER++ a second, independent batch x''):

    DER:    L = CE(z(x), y) + alpha * MSE(z(x'), z_stored(x'))
    DER++:  L = CE(z(x), y) + alpha * MSE(z(x'), z_stored(x')) + beta * CE(z(x''), y'')

Replay starts as soon as the memory holds a sample (the first task included). With cilkit's growing
head the logits stored before the head grew are narrower; the memory pads them with NaN and the MSE
is taken over the stored entries only. Losses, options and their sources: docs/methods/dark-er.md
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilkit.methods.er import StreamReplay
from cilkit.schema import param

NOT_YAN = "Dark Experience Replay (DER in Buzzega et al.), not Yan et al.'s DER (`der`)"


def stored_logits_mse(z: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """MSE between the current logits ``z`` (B, C) and the stored ones (B, C' <= C; NaN where a column
    was not stored): the mean of the squared differences over the stored entries only (with every
    column stored, ``F.mse_loss``, Mammoth's loss)."""
    z = z[:, : stored.shape[1]].float()
    known = ~torch.isnan(stored)
    diff = torch.where(known, z - stored.nan_to_num(0.0), torch.zeros_like(z))
    return diff.pow(2).sum() / known.sum().clamp(min=1)


@dataclass
class DarkERHyper:
    # the weight of the logit-matching term; Mammoth best_args Seq-MNIST buffer 200: 0.2 (others:
    # docs/methods/dark-er.md)
    alpha: float = param(0.2, ge=0)
    # exemplars per memory batch; None: the stream batch's size (Mammoth's minibatch_size, 10 on Seq-MNIST
    # buffer 200)
    replay_batch_size: int | None = param(None, ge=1)


@dataclass
class DarkERPlusPlusHyper:
    # Mammoth best_args Seq-MNIST buffer 200: alpha 0.2, beta 1.0 (others: docs/methods/dark-er.md)
    alpha: float = param(0.2, ge=0)
    beta: float = param(1.0, ge=0)  # the weight of the CE on the second memory batch
    # exemplars per memory batch (each of the two); None: the stream batch's size (Mammoth's minibatch_size)
    replay_batch_size: int | None = param(None, ge=1)


class DarkER(StreamReplay):
    """Dark Experience Replay (DER in Buzzega et al.), not Yan et al.'s DER (``der``). Buzzega, Boschini,
    Porrello, Abati & Calderara, Dark Experience for General Continual Learning, NeurIPS 2020: CE on the
    stream plus alpha * MSE to the logits stored with a memory batch. docs/methods/dark-er.md"""

    name = "dark-er"
    paper = (f"{NOT_YAN}: Buzzega, Boschini, Porrello, Abati & Calderara, Dark Experience for General "
             "Continual Learning: a Strong, Simple Baseline, NeurIPS 2020")
    Hyper = DarkERHyper
    selections = ("reservoir",)
    fixed_head = True  # with model.head: fixed every stored row has all N columns (no NaN), as in the paper
    # the paper's single head by default: with a growing head the logits stored before the head grew say
    # nothing of the later classes, and DER (without DER++'s CE term) forgets as finetuning does (digits:
    # 45.76 average incremental accuracy against 94.39 with the fixed head, alpha 1)
    default_head = "fixed"

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        self.step_logits: torch.Tensor | None = None  # the stream batch's logits of the last step, detached

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.net(x)["logits"].float()
        self.step_logits = z.detach()
        return F.cross_entropy(z, y) + self.replay_loss(len(y))

    def replay_loss(self, n_stream: int) -> torch.Tensor | float:
        """alpha * MSE to the stored logits on a memory batch (0 while the memory is empty)."""
        batch = self.replay(n_stream)
        if batch is None:
            return 0.0
        x, _, pos = batch
        stored = self.memory.payload["logits"][pos.to(self.memory.device)].to(x.device)
        return self.hp.alpha * stored_logits_mse(self.net(x)["logits"], stored)

    def observe(self, indices: torch.Tensor, labels: torch.Tensor) -> None:
        """The stream batch enters the reservoir with the logits the network gave it at this step."""
        self.memory.observe(indices, labels, mask=self.stream_part(labels), logits=self.step_logits)


class DarkERPlusPlus(DarkER):
    """DER++: Dark Experience Replay (DER in Buzzega et al.), not Yan et al.'s DER (``der``), plus
    beta * CE on a second, independent memory batch. docs/methods/dark-er.md"""

    name = "dark-er++"
    paper = (f"DER++, {NOT_YAN}: Buzzega, Boschini, Porrello, Abati & Calderara, Dark Experience for General "
             "Continual Learning: a Strong, Simple Baseline, NeurIPS 2020")
    Hyper = DarkERPlusPlusHyper

    def replay_loss(self, n_stream: int) -> torch.Tensor | float:
        loss = super().replay_loss(n_stream)
        batch = self.replay(n_stream)  # drawn independently of the first (Mammoth: a second get_data)
        if batch is None:
            return loss
        return loss + self.hp.beta * F.cross_entropy(self.net(batch[0])["logits"].float(), batch[1])
