"""Memories filled as the stream passes: reservoir sampling and the class-balanced (greedy) rule.

Unlike :class:`cilkit.memory.exemplars.ExemplarMemory`, which selects a task's exemplars once the
task is trained, a stream memory takes in every batch of new data right after its training step
(online class-incremental learning; Chaudhry et al., "On Tiny Episodic Memories in Continual
Learning", 2019; Buzzega et al., NeurIPS 2020). It has ``capacity`` slots; each slot holds a
training index, its label and optional per-slot payload (Dark Experience Replay's logits).

- ``reservoir`` (Vitter's algorithm R): the i-th item offered (0-based) fills slot i while the memory
  is not full, then replaces a uniformly drawn slot with probability K / (i + 1), so that every item
  of the stream is in memory with the same probability K / n. A batch is inserted with a few tensor
  operations and no per-item Python: every item draws its slot, and of two items drawing the same slot
  the later one wins (one scatter), as in the sequential rule; while the memory has room for the
  whole batch, it is copied into the next slots.
- ``balanced`` (GDumb's greedy class-balanced sampler, Prabhu et al., ECCV 2020, Sec. 3): an item is
  stored while the memory has room; once full, an item of a class holding fewer than K / n_classes
  slots (the classes seen so far, its own included) replaces a random item of a largest class, and
  other items are dropped. Sequential by nature: a Python loop over the batch on the host.

The memory answers the same questions as an exemplar memory (``indices``, ``classes``,
``exemplars``, ``len``), so that NME class means and concatenation replay work on it unchanged.
"""

from __future__ import annotations

import torch

STREAM_RULES = ("reservoir", "balanced")


class StreamMemory:
    streaming = True  # filled by :meth:`observe` during training, not by :meth:`update` after it

    def __init__(self, capacity: int, rule: str = "reservoir", device: torch.device | str = "cpu",
                 replay_ratio: float | None = None):
        if rule not in STREAM_RULES:
            raise ValueError(f"rule must be one of {STREAM_RULES}")
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.selection = rule
        self.replay_ratio = replay_ratio
        self.device = torch.device(device)
        self.slots = torch.full((capacity,), -1, dtype=torch.long, device=self.device)  # training index, -1: empty
        self.labels = torch.full((capacity,), -1, dtype=torch.long, device=self.device)
        self.payload: dict[str, torch.Tensor] = {}
        self.seen = 0  # items offered so far (the reservoir's counter)
        self.filled = 0  # slots in use; reservoir and balanced rules fill slots 0, 1, ... in order
        self._order: dict[int, torch.Tensor] = {}  # arange(n) of each batch size met (not state)

    # -- what is stored ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.filled

    @property
    def classes(self) -> list[int]:
        return sorted(int(c) for c in self.labels[: self.filled].unique().tolist())

    @property
    def exemplars(self) -> dict[int, torch.Tensor]:
        """Training indices of each stored class, in slot order."""
        labels, slots = self.labels[: self.filled], self.slots[: self.filled]
        return {c: slots[labels == c] for c in self.classes}

    def indices(self, classes: list[int] | range | None = None) -> torch.Tensor:
        """Training indices of the stored samples of ``classes`` (all by default), grouped by class."""
        ex = self.exemplars
        keys = sorted(ex) if classes is None else [c for c in classes if c in ex]
        if not keys:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return torch.cat([ex[c] for c in keys])

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` stored samples drawn uniformly without replacement (all when fewer are stored):
        (training indices, slot positions); the positions address :attr:`payload`."""
        pos = torch.randperm(self.filled, device=self.device)[:n]
        return self.slots[pos], pos

    def update(self, new_classes, class_indices, features, generator=None) -> None:
        """Nothing to do after a task: the stream filled the memory as it passed."""

    # -- taking the stream in ------------------------------------------------------------------

    def observe(self, idx: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                **payload: torch.Tensor) -> None:
        """Offer the stream's batch (training indices ``idx``, their ``labels``; only where ``mask``),
        with per-item ``payload`` tensors (first dimension = batch) stored beside the items kept."""
        if idx.device != self.device or labels.device != self.device:  # (a no-op .to still costs a dispatch)
            idx, labels = idx.to(self.device), labels.to(self.device)
        payload = {k: v.detach().to(self.device) if v.requires_grad or v.device != self.device else v
                   for k, v in payload.items()}
        if mask is not None:
            mask = mask.to(self.device)
            idx, labels = idx[mask], labels[mask]
            payload = {k: v[mask] for k, v in payload.items()}
        if len(idx) == 0:
            return
        start = self.seen
        winner = self._reservoir_slots(len(idx)) if self.selection == "reservoir" else self._balanced_slots(labels)
        if winner is None:  # the memory had room for the whole batch: it fills the next slots, in order
            stop = start + len(idx)
            self.slots[start:stop] = idx
            self.labels[start:stop] = labels
            for key, value in payload.items():
                old, value = self._widened(key, value)
                old[start:stop] = value
            return
        hit = winner >= 0
        src = winner.clamp(min=0)
        self.slots = torch.where(hit, idx[src], self.slots)
        self.labels = torch.where(hit, labels[src], self.labels)
        for key, value in payload.items():
            old, value = self._widened(key, value)
            value = value[src] if value.dtype == old.dtype else value[src].to(old.dtype)
            self.payload[key] = torch.where(hit.view(-1, *([1] * (old.dim() - 1))), value, old)

    def _reservoir_slots(self, n: int) -> torch.Tensor | None:
        """For every slot, the position in the batch of the item that takes it (-1: kept as it is); None
        when the batch fits in the free slots (they are taken in order). A handful of tensor operations
        whatever the batch (the online step is small, so their count is its overhead): one uniform draw
        per item, also while the memory fills, so that the random stream does not depend on the phase."""
        K, seen = self.capacity, self.seen
        u = torch.rand(n, device=self.device, dtype=torch.float64)
        self.seen, self.filled = seen + n, min(K, seen + n)
        if seen + n <= K:
            return None
        # item i (0-based over the stream) draws slot floor(u * (i + 1)) in [0, i] (u < 1 in float64, and the
        # product of an integer m and the largest u rounds below m); it is kept when that slot is < K
        slot = u.mul_(torch.arange(seen + 1, seen + n + 1, device=self.device, dtype=torch.float64)).long()
        if seen < K:  # the batch crosses the moment the memory fills: its first items take the free slots
            slot[: K - seen] = torch.arange(seen, K, device=self.device)
        slot.clamp_(max=K)  # K: a dump slot for the items not kept
        order = self._order.get(n)
        if order is None or order.device != self.device:
            order = self._order[n] = torch.arange(n, device=self.device)
        winner = torch.full((K + 1,), -1, dtype=torch.long, device=self.device)
        return winner.scatter_reduce_(0, slot, order, reduce="amax")[:K]  # of two items on one slot, the later wins

    def _balanced_slots(self, labels: torch.Tensor) -> torch.Tensor:
        """GDumb's greedy rule, item by item on the host (it is sequential)."""
        K = self.capacity
        by_class: dict[int, list[int]] = {}
        for s, c in enumerate(self.labels[: self.filled].tolist()):
            by_class.setdefault(c, []).append(s)
        winner = [-1] * K
        for i, c in enumerate(labels.tolist()):
            self.seen += 1
            if self.filled < K:
                slot = self.filled
                self.filled += 1
            else:
                n_classes = len(by_class) + (c not in by_class)
                if len(by_class.get(c, ())) >= K // n_classes:
                    continue
                largest = max(len(v) for v in by_class.values())
                victim = min(k for k, v in by_class.items() if len(v) == largest)  # ties: the earliest class
                pool = by_class[victim]
                j = int(torch.randint(len(pool), ()).item())
                pool[j], pool[-1] = pool[-1], pool[j]
                slot = pool.pop()
                if not pool:
                    del by_class[victim]
            by_class.setdefault(c, []).append(slot)
            winner[slot] = i
        return torch.tensor(winner, dtype=torch.long, device=self.device)

    def _widened(self, key: str, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Payload ``key`` (created, NaN, on first use) and the batch's ``value``, made equally wide: a
        wider value (a head that grew) widens the stored tensor, the new columns of older items being NaN
        (unknown), and a narrower one is padded with NaN."""
        old = self.payload.get(key)
        if old is None:
            old = self.payload[key] = torch.full((self.capacity, *value.shape[1:]), float("nan"), dtype=value.dtype,
                                                 device=self.device)
        if value.dim() > 1 and value.shape[1] > old.shape[1]:
            pad = torch.full((self.capacity, value.shape[1] - old.shape[1], *old.shape[2:]), float("nan"),
                             dtype=old.dtype, device=self.device)
            old = self.payload[key] = torch.cat([old, pad], 1)
        elif value.dim() > 1 and value.shape[1] < old.shape[1]:
            pad = torch.full((value.shape[0], old.shape[1] - value.shape[1], *value.shape[2:]), float("nan"),
                             dtype=value.dtype, device=self.device)
            value = torch.cat([value, pad], 1)
        return old, value

    def update_payload(self, key: str, pos: torch.Tensor, value: torch.Tensor) -> None:
        """Overwrite payload ``key`` at slot positions ``pos`` (e.g. a logits refresh)."""
        self.payload[key][pos] = value.detach().to(self.payload[key].dtype)

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"slots": self.slots.clone(), "labels": self.labels.clone(), "seen": self.seen, "filled": self.filled,
                "payload": {k: v.clone() for k, v in self.payload.items()}}

    def load_state_dict(self, state: dict) -> None:
        # copies: the memory writes its slots in place while it fills, and the state is the caller's
        self.slots = state["slots"].to(self.device).clone()
        self.labels = state["labels"].to(self.device).clone()
        self.seen, self.filled = int(state["seen"]), int(state["filled"])
        self.payload = {k: v.to(self.device).clone() for k, v in state["payload"].items()}
