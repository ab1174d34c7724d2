"""Replay (experience replay): finetuning on the new data plus a small exemplar memory.

Per task (methods-spec section 3): grow the classifier, train all parameters on D_t U M with

    L = CE(z(x), y)    over all seen classes, for new samples and exemplars alike,

then shrink the old classes' exemplars to the new quota and select the new classes' exemplars by
herding with the model after the task (Rebuffi et al., iCaRL, CVPR 2017, Alg. 4). The batches mix
D_t and M at random (PyCIL's "Replay"). Accuracy is reported for the classifier head and for the
nearest-mean-of-exemplars classifier.
"""

from __future__ import annotations

from cilkit.methods.base import Method


class Replay(Method):
    name = "replay"
    paper = "Experience replay with a herding memory (PyCIL's Replay; Rebuffi et al., CVPR 2017 for herding)"
    memory_use = "required"
