"""Replay (experience replay): finetuning on the new data plus a small exemplar memory.

PyCIL's "Replay" baseline, with the herding selection of Rebuffi et al., "iCaRL: Incremental
Classifier and Representation Learning", CVPR 2017 (Alg. 4). Each task trains all parameters on the
new data and the exemplars mixed at random, then shrinks the old classes' exemplars and herds the
new classes' with the model after the task; accuracy is reported for the head (CNN) and by NME.

    L = CE(z(x), y)    over all seen classes, for new samples and exemplars alike

Losses, options and their sources: docs/methods/replay.md
"""

from __future__ import annotations

from cilkit.methods.base import Method


class Replay(Method):
    name = "replay"
    paper = "Experience replay with a herding memory (PyCIL's Replay; Rebuffi et al., CVPR 2017 for herding)"
    memory_use = "required"
    # a stream memory (reservoir, balanced) works too: its exemplars are used as a task-end memory's
    selections = ("herding", "random", "reservoir", "balanced")
    fixed_head = True  # the base loss: CE over every logit
