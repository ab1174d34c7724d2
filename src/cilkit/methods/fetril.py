"""FeTrIL: a feature extractor frozen after the first task, and pseudo-features of the old classes made by
translating the new classes' features.

Grégoire Petit, Adrian Popescu, Hugo Schindler, David Picard, Bertrand Delezoide, "FeTrIL: Feature
Translation for Exemplar-Free Class-Incremental Learning", WACV 2023, pp. 3911-3920; official code
github.com/GregoirePetit/FeTrIL (codes/compute_distances.py, train_classifiers.py, compute_predictions.py).
The first task trains the network with cross-entropy. From then on the extractor is frozen:
:meth:`FeTrIL.stage` gives the driver's main training 0 epochs, so the loop takes no step on images.
The method keeps one centroid per class. After every task (eval mode, test transforms), each old class
c gets pseudo-features, the features of a new class n translated onto its centroid,

    f^(c) = f(n) - mu_n + mu_c,   n = argmin_{new n} ||mu_c - mu_n||_2     (the closest new class)

and a linear classifier is trained on the new classes' real features and the old classes' pseudo-features:
a linear SVM (one-vs-rest, on L2-normalised features; the paper's main variant, also on the first
task's real features), or, as FeTrIL^fc, the network's FC head (trained with cross-entropy on the raw
features, as PyCIL). Options and sources: docs/methods/fetril.md
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cilkit.data.scenario import Task
from cilkit.methods.base import Method
from cilkit.schema import param
from cilkit.training.stage import Stage, build_optimizer, build_scheduler

log = logging.getLogger("cilkit")


def translation_sources(old_means: torch.Tensor, new_means: torch.Tensor, rule: str = "closest",
                        distance: str = "euclidean", generator: torch.Generator | None = None) -> torch.Tensor:
    """For each old class, the index (among the new classes) of the class whose features are translated.

    ``closest``: the smallest Euclidean distance between the centroids (official compute_distances.py), or
    the largest cosine similarity (``distance: cosine``, PyCIL); ``random``: a new class drawn uniformly.
    """
    if rule == "random":
        return torch.randint(len(new_means), (len(old_means),), generator=generator).to(old_means.device)
    if distance == "cosine":
        return (F.normalize(old_means, dim=1) @ F.normalize(new_means, dim=1).T).argmax(1)
    return torch.cdist(old_means, new_means).argmin(1)


def pseudo_features(new_feats: list[torch.Tensor], new_means: torch.Tensor, old_means: torch.Tensor,
                    sources: torch.Tensor) -> list[torch.Tensor]:
    """The pseudo-features of each old class c: f(n) - mu_n + mu_c for every feature f(n) of its source class n."""
    return [new_feats[s] - new_means[s] + old_means[c] for c, s in enumerate(sources.tolist())]


def fit_linear_svm(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-vs-rest linear SVM (scikit-learn's LinearSVC: liblinear, squared hinge, L2, primal, with an
    intercept), as the official train_classifiers.py; returns (W [n_classes, d], b [n_classes]).

    With two classes LinearSVC fits one separator (for ``classes_[1]``); the other class's one-vs-rest
    problem is the same with the labels flipped, whose solution is the negated one."""
    from sklearn.svm import LinearSVC

    clf = LinearSVC(penalty="l2", loss="squared_hinge", dual=False, tol=tol, C=C, multi_class="ovr",
                    fit_intercept=True, intercept_scaling=1.0)
    clf.fit(x.double().cpu().numpy(), y.cpu().numpy())
    if list(clf.classes_) != list(range(n_classes)):
        raise ValueError(f"the SVM's training set lacks classes: has {list(clf.classes_)}, needs 0..{n_classes - 1}")
    w = torch.from_numpy(clf.coef_).float()
    b = torch.from_numpy(clf.intercept_).float()
    if n_classes == 2:
        w, b = torch.cat([-w, w]), torch.cat([-b, b])
    return w, b


def fit_head_on_features(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, stage: Stage,
                         generator: torch.Generator) -> float:
    """Train ``head`` with cross-entropy on feature vectors (FeTrIL^fc): the stage's epochs, optimizer, rate and
    schedule over shuffled mini-batches. The shared loop draws images; these are features, so the few lines
    are here. Returns the last epoch's mean loss."""
    optimizer = build_optimizer([{"params": list(head.parameters())}], stage)
    steps = max(1, -(-len(x) // stage.batch_size))
    scheduler = build_scheduler(optimizer, stage, steps)
    total = torch.zeros((), device=x.device)
    for _ in range(stage.epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        total = torch.zeros((), device=x.device)
        for idx in order.split(stage.batch_size):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach()
    return total.item() / steps  # the one host sync


@dataclass
class FeTrILHyper:
    # svm: a linear SVM, the paper's main FeTrIL [paper/recalled; official train_classifiers.py];
    # fc: FeTrIL^fc, the network's FC head trained on the features (the paper's ablation; PyCIL's only variant)
    classifier: Literal["svm", "fc"] = "svm"
    # closest: each old class translates its nearest new class [paper/recalled; official compute_distances.py];
    # random: a new class drawn at random
    source: Literal["closest", "random"] = "closest"
    distance: Literal["euclidean", "cosine"] = "euclidean"  # nearest by centroid distance (official) or cosine (PyCIL)
    svm_c: float = param(1.0, gt=0)  # LinearSVC C: official configs/cifar100_b50_t10.cf regul = 1.0
    svm_tol: float = param(1e-4, gt=0)  # LinearSVC tol: official toler = 0.0001
    fc_epochs: int = param(50, ge=1)  # classifier: fc, epochs on the features: PyCIL exps/fetril.json epochs 50
    fc_lr: float = param(0.05, gt=0)  # classifier: fc, SGD rate (cosine schedule): PyCIL exps/fetril.json lr 0.05


class FeTrIL(Method):
    name = "fetril"
    paper = ("Petit, Popescu, Schindler, Picard, Delezoide, FeTrIL: Feature Translation for Exemplar-Free "
             "Class-Incremental Learning, WACV 2023")
    Hyper = FeTrILHyper
    memory_use = "none"  # exemplar-free: one centroid per class

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        self.means: torch.Tensor | None = None  # [n_seen, d]: the class centroids of the frozen features
        self.svm_weight: torch.Tensor | None = None  # [n_seen, d] (classifier: svm)
        self.svm_bias: torch.Tensor | None = None  # [n_seen]

    # -- the frozen extractor -----------------------------------------------------------------------------

    def stage(self, task: Task) -> Stage:
        """The first task trains with the configured stage; every later one has 0 epochs on images (the loop
        takes no step): the extractor is frozen and the classifier is trained on features in ``after_task``."""
        stage = super().stage(task)
        return stage if task.index == 0 else stage.replace(epochs=0)

    def extract(self, c: int) -> torch.Tensor:
        """Backbone features of class ``c``'s training images (eval mode, test transforms)."""
        return self.features(self.ctx.train_data.indices_of([c]), forward=self.net.backbone)

    def generator(self, task: Task, salt: int = 0) -> torch.Generator:
        """A generator of the run's seed and the task (the same draws when a run is resumed)."""
        return torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + 7_919 * task.index + salt)

    # -- pseudo-features and the classifier, after each task ---------------------------------------------------

    def after_task(self, task: Task) -> None:
        new_feats = [self.extract(c).detach().float() for c in task.classes]
        new_means = torch.stack([f.mean(0) for f in new_feats])
        old_means = self.means if self.means is not None else new_means[:0]
        x = list(new_feats)
        y = [torch.full((len(f),), c, dtype=torch.long, device=f.device) for c, f in zip(task.classes, new_feats)]
        if task.start > 0:
            sources = translation_sources(old_means, new_means, self.hp.source, self.hp.distance, self.generator(task))
            pseudo = pseudo_features(new_feats, new_means, old_means, sources)
            x += pseudo
            y += [torch.full((len(f),), c, dtype=torch.long, device=f.device) for c, f in enumerate(pseudo)]
        self.means = torch.cat([old_means, new_means])
        x, y = torch.cat(x), torch.cat(y)
        if self.hp.classifier == "svm":
            w, b = fit_linear_svm(F.normalize(x, dim=1), y, task.stop, self.hp.svm_c, self.hp.svm_tol)
            self.svm_weight, self.svm_bias = w.to(self.ctx.device), b.to(self.ctx.device)
        elif task.start > 0:  # fc: the first task's head is the one trained with the network
            stage = self.extra_stage(task, epochs=self.hp.fc_epochs, lr=self.hp.fc_lr, optimizer="sgd", schedule="cosine",
                                     milestones=[])  # PyCIL: SGD, CosineAnnealingLR over fc_epochs
            loss = fit_head_on_features(self.net.head, x, y, stage, self.generator(task, salt=1))
            log.info("%s task %d: FC head trained on the features, last epoch's loss %.4f", self.name, task.index + 1, loss)
        log.info("%s task %d: %s on %d real and %d pseudo-features of %d classes", self.name, task.index + 1,
                 self.hp.classifier, sum(len(f) for f in new_feats), len(x) - sum(len(f) for f in new_feats), task.stop)

    # -- prediction -----------------------------------------------------------------------------------------

    def inference(self, x: torch.Tensor) -> dict:
        out = self.net(x)
        if self.hp.classifier == "fc" or self.svm_weight is None:
            return out
        with torch.autocast(x.device.type, enabled=False):  # the SVM's scores in float32, outside bf16 autocast
            logits = F.normalize(out["features"].float(), dim=1) @ self.svm_weight.T + self.svm_bias
        return {"logits": logits, "features": out["features"]}

    # -- checkpoints ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("means", "svm_weight", "svm_bias") if getattr(self, key) is not None}

    def load_state_dict(self, state: dict) -> None:
        for key in ("means", "svm_weight", "svm_bias"):
            value = state.get(key)
            setattr(self, key, value.to(self.ctx.device) if value is not None else None)
