"""Memories filled as the stream passes: reservoir sampling and the class-balanced (greedy) rule.

Unlike :class:`cilkit.memory.exemplars.ExemplarMemory`, which selects a task's exemplars once the
task is trained, a stream memory takes in every batch of new data right after its training step
(online class-incremental learning; Chaudhry et al., "On Tiny Episodic Memories in Continual
Learning", 2019; Buzzega et al., NeurIPS 2020). It has ``capacity`` slots; each slot holds a
training index, its label and optional per-slot payload (Dark Experience Replay's logits).

- ``reservoir`` (Vitter's algorithm R): the i-th item offered (0-based) fills slot i while the memory
  is not full, then replaces a uniformly drawn slot with probability K / (i + 1), so that every item
  of the stream is in memory with the same probability K / n. A batch is inserted with one tensor
  operation: every item draws its slot, and of two items drawing the same slot the later one wins,
  as in the sequential rule.
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
        idx, labels = idx.to(self.device), labels.to(self.device)
        payload = {k: v.detach().to(self.device) for k, v in payload.items()}
        if mask is not None:
            mask = mask.to(self.device)
            idx, labels = idx[mask], labels[mask]
            payload = {k: v[mask] for k, v in payload.items()}
        if len(idx) == 0:
            return
        if self.selection == "reservoir":
            winner = self._reservoir_slots(len(idx))
        else:
            winner = self._balanced_slots(labels)
        hit = winner >= 0
        src = winner.clamp(min=0)
        self.slots = torch.where(hit, idx[src], self.slots)
        self.labels = torch.where(hit, labels[src], self.labels)
        for key, value in payload.items():
            self._store(key, value, hit, src)

    def _reservoir_slots(self, n: int) -> torch.Tensor:
        """For every slot, the position in the batch of the item that takes it (-1: kept as it is)."""
        K = self.capacity
        pos = torch.arange(self.seen, self.seen + n, device=self.device, dtype=torch.float64)
        drawn = (torch.rand(n, device=self.device, dtype=torch.float64) * (pos + 1)).floor().clamp(max=pos)
        slot = torch.where(pos < K, pos, drawn).long()
        slot = torch.where(slot < K, slot, torch.full_like(slot, K))  # K: a dump slot for the items not kept
        order = torch.arange(n, device=self.device)
        winner = torch.full((K + 1,), -1, dtype=torch.long, device=self.device)
        winner = winner.scatter_reduce(0, slot, order, reduce="amax", include_self=True)[:K]  # the later item wins
        self.seen += n
        self.filled = min(K, self.seen)
        return winner

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

    def _store(self, key: str, value: torch.Tensor, hit: torch.Tensor, src: torch.Tensor) -> None:
        """Write the kept items' ``value`` into payload ``key``; a wider value (a head that grew)
        widens the stored tensor, the new columns of older items being NaN (unknown)."""
        old = self.payload.get(key)
        if old is None:
            old = torch.full((self.capacity, *value.shape[1:]), float("nan"), dtype=value.dtype, device=self.device)
        if value.dim() > 1 and value.shape[1] > old.shape[1]:
            pad = torch.full((self.capacity, value.shape[1] - old.shape[1], *old.shape[2:]), float("nan"),
                             dtype=old.dtype, device=self.device)
            old = torch.cat([old, pad], 1)
        elif value.dim() > 1 and value.shape[1] < old.shape[1]:
            pad = torch.full((value.shape[0], old.shape[1] - value.shape[1], *value.shape[2:]), float("nan"),
                             dtype=value.dtype, device=self.device)
            value = torch.cat([value, pad], 1)
        mask = hit.view(-1, *([1] * (old.dim() - 1)))
        self.payload[key] = torch.where(mask, value[src].to(old.dtype), old)

    def update_payload(self, key: str, pos: torch.Tensor, value: torch.Tensor) -> None:
        """Overwrite payload ``key`` at slot positions ``pos`` (e.g. a logits refresh)."""
        self.payload[key][pos] = value.detach().to(self.payload[key].dtype)

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"slots": self.slots.clone(), "labels": self.labels.clone(), "seen": self.seen, "filled": self.filled,
                "payload": {k: v.clone() for k, v in self.payload.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.slots = state["slots"].to(self.device)
        self.labels = state["labels"].to(self.device)
        self.seen, self.filled = int(state["seen"]), int(state["filled"])
        self.payload = {k: v.to(self.device) for k, v in state["payload"].items()}
