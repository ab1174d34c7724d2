"""The online setting and the stream memories: reservoir sampling, the class-balanced rule, the
per-step replay batch of ER, the online scenario's config, rehearsal at a set ratio."""

from __future__ import annotations

import pytest
import torch

import cilkit
from cilkit.errors import ConfigError
from cilkit.memory.exemplars import repeat_to
from cilkit.memory.nme import class_means, nme_scores
from cilkit.memory.stream import StreamMemory
from tests.tiny import assert_complete_run, open_task, tiny_driver


# -- reservoir sampling ---------------------------------------------------------------------------


def test_reservoir_fills_in_order_then_keeps_capacity():
    mem = StreamMemory(5, "reservoir")
    mem.observe(torch.arange(3), torch.tensor([0, 0, 1]))
    assert len(mem) == 3 and mem.slots[:3].tolist() == [0, 1, 2] and mem.slots[3:].tolist() == [-1, -1]
    mem.observe(torch.arange(3, 50), torch.arange(3, 50) % 4)
    assert len(mem) == 5 and mem.seen == 50
    kept = mem.slots.tolist()
    assert len(set(kept)) == 5 and all(0 <= i < 50 for i in kept)
    assert mem.labels.tolist() == [i % 4 if i >= 3 else [0, 0, 1][i] for i in kept]


def _inclusion(trials: int = 300, n: int = 600, K: int = 60, batch: int = 10) -> torch.Tensor:
    torch.manual_seed(0)
    counts = torch.zeros(n)
    for _ in range(trials):
        mem = StreamMemory(K, "reservoir")
        for start in range(0, n, batch):
            idx = torch.arange(start, start + batch)
            mem.observe(idx, torch.zeros(batch, dtype=torch.long))
        counts[mem.slots] += 1
    return counts / trials


def test_reservoir_keeps_every_item_with_probability_k_over_n():
    """Every item of the stream ends in memory with probability K / n = 0.1, early or late, batch by
    batch: the mean inclusion of each tenth of the stream lies within 4 standard errors of 0.1."""
    p = _inclusion()
    groups = p.view(10, -1).mean(1)
    se = (0.1 * 0.9 / (300 * 60)) ** 0.5
    assert torch.all((groups - 0.1).abs() < 4 * se), groups
    assert abs(p.sum().item() - 60) < 1e-6  # exactly K slots used in every trial


def test_a_wrong_reservoir_rule_fails_the_same_check():
    """The check has power: replacing a random slot for every item past K (no K/(i+1) acceptance)
    favours the stream's end and fails it."""
    torch.manual_seed(0)
    counts = torch.zeros(600)
    for _ in range(100):
        mem = StreamMemory(60, "reservoir")
        mem.observe(torch.arange(60), torch.zeros(60, dtype=torch.long))
        for start in range(60, 600, 10):
            idx = torch.arange(start, start + 10)
            slots = torch.randint(60, (10,))  # the wrong rule
            mem.slots[slots] = idx
        counts[mem.slots] += 1
    groups = (counts / 100).view(10, -1).mean(1)
    se = (0.1 * 0.9 / (100 * 60)) ** 0.5
    assert not torch.all((groups - 0.1).abs() < 4 * se)


def _sequential_reservoir(K: int, batches: list[int], seed: int) -> tuple[list[int], list[list[float]]]:
    """Vitter's algorithm R item by item, given the same uniform draws as the memory (one float64 per
    item offered, batch by batch): the i-th item (0-based) fills slot i while i < K, else slot
    floor(u * (i + 1)) when that is < K; the slots' items and payload rows after the stream."""
    torch.manual_seed(seed)
    slots, rows, i = [-1] * K, [[float("nan")]] * K, 0
    for n in batches:
        u = torch.rand(n, dtype=torch.float64).tolist()
        for k in range(n):
            j = i if i < K else int(u[k] * (i + 1))
            if j < K:
                slots[j], rows[j] = i, [float(i)]
            i += 1
    return slots, rows


def test_batched_reservoir_equals_the_item_by_item_rule():
    """The batched insertion (a scatter in which the later of two items on one slot wins, a copy while
    the memory has room) leaves exactly the slots and payload of the sequential rule with the same draws;
    small K and large batches make many items of one batch draw the same slot, and batches cross the
    moment the memory fills."""
    K, batches = 7, [3, 2, 5, 1, 20, 20, 9, 40, 40, 40, 2, 33]
    torch.manual_seed(5)
    mem, start = StreamMemory(K, "reservoir"), 0
    for n in batches:
        idx = torch.arange(start, start + n)
        mem.observe(idx, idx % 3, logits=idx.double().view(-1, 1))
        start += n
    slots, rows = _sequential_reservoir(K, batches, seed=5)
    assert mem.slots.tolist() == slots and mem.labels.tolist() == [s % 3 for s in slots]
    assert mem.payload["logits"].tolist() == rows
    assert mem.seen == sum(batches) and len(mem) == K


def test_reservoir_mask_offers_only_the_new_data_and_payload_follows_items():
    mem = StreamMemory(4, "reservoir")
    idx = torch.tensor([10, 11, 12, 13, 14])
    y = torch.tensor([0, 1, 1, 0, 1])
    logits = torch.arange(10.0).view(5, 2)
    mem.observe(idx, y, mask=y == 1, logits=logits)
    assert mem.seen == 3 and mem.slots[:3].tolist() == [11, 12, 14]
    assert torch.equal(mem.payload["logits"][:3], logits[[1, 2, 4]])
    # a wider payload (a grown head) widens the stored tensor with NaN for the older items
    mem.observe(torch.tensor([20]), torch.tensor([2]), logits=torch.tensor([[7.0, 8.0, 9.0]]))
    assert mem.payload["logits"].shape == (4, 3)
    assert torch.isnan(mem.payload["logits"][:3, 2]).all() and mem.payload["logits"][3].tolist() == [7.0, 8.0, 9.0]


def test_stream_memory_state_round_trip():
    torch.manual_seed(1)
    mem = StreamMemory(8, "reservoir")
    mem.observe(torch.arange(30), torch.arange(30) % 3, logits=torch.randn(30, 3))
    other = StreamMemory(8, "reservoir")
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.slots, mem.slots) and other.seen == mem.seen and len(other) == len(mem)
    assert torch.equal(other.payload["logits"], mem.payload["logits"])
    assert {c: v.tolist() for c, v in other.exemplars.items()} == {c: v.tolist() for c, v in mem.exemplars.items()}


# -- the class-balanced rule ------------------------------------------------------------------------


def test_balanced_rule_evens_out_classes_within_capacity():
    torch.manual_seed(0)
    mem = StreamMemory(30, "balanced")
    y = torch.cat([torch.zeros(100), torch.ones(40), torch.full((20,), 2.0)]).long()  # unbalanced, class by class
    mem.observe(torch.arange(len(y)), y)
    counts = [len(v) for v in mem.exemplars.values()]
    assert len(mem) == 30 and sorted(counts) == [10, 10, 10]
    # a class with less data than its share keeps all of it; a later class stops at K // n_classes
    # (GDumb's greedy rule), the earlier largest one keeps the rest
    mem2 = StreamMemory(30, "balanced")
    y2 = torch.cat([torch.zeros(100), torch.ones(4), torch.full((60,), 2.0)]).long()
    mem2.observe(torch.arange(len(y2)), y2)
    c2 = {c: len(v) for c, v in mem2.exemplars.items()}
    assert c2 == {0: 16, 1: 4, 2: 10}


# -- NME with a memory that lacks a class ------------------------------------------------------------


def test_class_means_leave_a_missing_class_unpredictable():
    mem = StreamMemory(4, "reservoir")
    mem.observe(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 2]))
    feats = torch.tensor([[1.0, 0], [1.0, 0.1], [0, 1.0]])
    means = class_means(mem, lambda idx, flip=False: feats[idx], flip=False, n_classes=3)
    assert torch.isnan(means[1]).all() and not torch.isnan(means[[0, 2]]).any()
    scores = nme_scores(torch.tensor([[0.1, 1.0], [1.0, 0.0]]), means)
    assert torch.isinf(scores[:, 1]).all() and scores.argmax(1).tolist() == [2, 0]


# -- rehearsal at a set ratio -----------------------------------------------------------------------


def test_repeat_to_a_ratio():
    idx = torch.arange(5)
    out = repeat_to(idx, 12)
    assert len(out) == 12 and torch.bincount(out, minlength=5).tolist().count(2) == 3
    assert torch.bincount(out, minlength=5).min() >= 2


def test_replay_ratio_sets_old_to_new_in_the_training_set():
    d = tiny_driver("replay", memory={"size": 40, "replay_ratio": 0.5})
    d.run_task(d.scenario.tasks[0])
    task = open_task(d, 1)
    idx = d.method.train_indices(task)
    labels = d.runtime.train_data.labels[idx]
    n_new = int((labels >= task.start).sum())
    assert int((labels < task.start).sum()) == round(0.5 * n_new)


# -- the online scenario ----------------------------------------------------------------------------


def test_online_mode_defaults_and_refusals():
    cfg = cilkit.resolve([{"method": "er", "scenario": {"mode": "online"}}])
    assert cfg.train.epochs == 1 and cfg.train.batch_size == 10 and cfg.train.schedule == "constant"
    assert cfg.memory.selection == "reservoir"  # ER's own rule
    assert cilkit.resolve([{"method": "replay"}]).memory.selection == "herding"
    with pytest.raises(ConfigError, match="train.epochs.*online setting sees each sample once"):
        cilkit.resolve([{"method": "er", "scenario": {"mode": "online"}, "train": {"epochs": 3}}])
    with pytest.raises(ConfigError, match="scenario.mode"):
        cilkit.resolve([{"method": "er", "scenario": {"mode": "stream"}}])
    with pytest.raises(ConfigError, match="memory.selection.*'wa' works with the memory rules herding, random"):
        cilkit.resolve([{"method": "wa", "memory": {"selection": "reservoir"}}])
    with pytest.raises(ConfigError, match="memory.per_class.*total capacity"):
        cilkit.resolve([{"method": "er", "memory": {"per_class": 5, "selection": "reservoir"}}])


def test_online_task_sees_each_sample_once_and_the_memory_takes_the_stream_in():
    d = tiny_driver("er", scenario={"name": "B0-Inc5", "mode": "online"}, memory={"size": 50}, train={"epochs": 1})
    assert isinstance(d.memory, StreamMemory)
    record = d.run_task(d.scenario.tasks[0])
    n = len(d.runtime.train_data.indices_of(range(5)))
    assert d.memory.seen == record["train_images"] == n - (n % 10 == 1)  # one pass (a last batch of 1 is dropped)
    assert len(d.memory) == 50 and set(d.memory.classes) <= set(range(5))
    d.run_task(d.scenario.tasks[1])
    assert d.memory.seen > n and len(d.memory) == 50  # the second task's stream was offered too
    assert max(d.memory.classes) >= 5


def test_er_replays_a_memory_batch_of_the_stream_batch_size_every_step():
    d = tiny_driver("er", memory={"size": 40})
    d.run_task(d.scenario.tasks[0])
    task = open_task(d, 1)
    sizes = []
    forward = d.method.net.forward

    def spy(x):
        sizes.append(len(x))
        return forward(x)

    d.method.net.forward = spy
    x, y = d.runtime.train_batch(d.method.train_indices(task)[:16])
    d.method.loss(x, y)
    assert sizes == [32]  # 16 stream + 16 replayed, one forward
    labels = d.runtime.train_data.labels[d.method.train_indices(task)]
    assert bool((labels >= task.start).all())  # the task's training set is its stream only


@pytest.mark.parametrize("method", ["er", "replay", "icarl", "lwf"])
def test_methods_run_online(tmp_path, method):
    layer = {"method": method, "scenario": {"name": "B0-Inc5", "mode": "online"},
             "model": {"backbone": "mlp", "hidden": [100, 100]}, "train": {"lr": 0.05}}
    if method != "lwf":
        layer["memory"] = {"size": 100}
    exp = cilkit.Experiment(cilkit.resolve([layer]), tmp_path / method, progress="off")
    metrics = exp.execute()
    assert_complete_run(metrics, floor=(60.0, 25.0), nme=method != "lwf")
    assert all(r["train_images"] <= len(exp.runtime.train_data) for r in metrics["tasks"])


@pytest.mark.parametrize("method", ["replay", "icarl", "gem", "agem"])
def test_offline_memory_methods_take_a_reservoir(tmp_path, method):
    """The offline rehearsal methods run with a reservoir filled during each task's first epoch."""
    layer = {"method": method, "scenario": {"name": "B0-Inc5"}, "model": {"backbone": "mlp", "hidden": [64]},
             "train": {"epochs": 2, "batch_size": 32}, "memory": {"size": 60, "selection": "reservoir"}}
    exp = cilkit.Experiment(cilkit.resolve([layer]), tmp_path / method, progress="off")
    metrics = exp.execute()
    assert isinstance(exp.method.memory, StreamMemory) and len(exp.method.memory) == 60
    n_train = len(exp.runtime.train_data)
    assert exp.method.memory.seen <= n_train  # each sample offered at most once (first epoch only)
    assert_complete_run(metrics, nme=True)


def test_an_online_run_killed_mid_task_resumes_to_the_same_final_metrics(tmp_path, monkeypatch):
    """Killed halfway through the second task's stream (the reservoir and its stored logits already
    changed in memory), the run resumes from the last checkpoint: the reservoir's slots, counter and
    stored logits and the RNG come back with it, and the final metrics equal the uninterrupted run's."""
    import json

    from cilkit.cli import main
    from cilkit.experiment import Experiment
    from cilkit.methods.dark_er import DarkER

    layer = {"method": "dark-er++", "scenario": {"name": "B0-Inc5", "mode": "online"}, "memory": {"size": 50},
             "model": {"backbone": "mlp", "hidden": [64]}, "train": {"lr": 0.05}}
    full_exp = Experiment(cilkit.resolve([layer]), tmp_path / "full", progress="off")
    full = full_exp.execute()
    original = DarkER.observe

    def killed(self, indices, labels):
        original(self, indices, labels)
        if self.task.index == 1 and self.at.step == 30:
            raise KeyboardInterrupt

    monkeypatch.setattr(DarkER, "observe", killed)
    with pytest.raises(KeyboardInterrupt):
        Experiment(cilkit.resolve([layer]), tmp_path / "cut", progress="off").execute()
    monkeypatch.setattr(DarkER, "observe", original)
    partial = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert len(partial["tasks"]) == 1
    assert main(["run", "--resume", str(tmp_path / "cut"), "--progress", "off"]) == 0
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    for a, b in zip(resumed["tasks"], full["tasks"]):
        assert a["cnn"] == b["cnn"]
    assert resumed["summary"]["last_accuracy"] == full["summary"]["last_accuracy"]
    a = torch.load(tmp_path / "full" / "checkpoints" / "task_001.pt", weights_only=True)["memory"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "task_001.pt", weights_only=True)["memory"]
    assert a["seen"] == b["seen"] and torch.equal(a["slots"], b["slots"])
    assert torch.equal(a["payload"]["logits"], b["payload"]["logits"])


def test_every_packaged_preset_resolves(tmp_path):
    """Every preset's keys, values and method arguments pass every check that needs no data."""
    from cilkit.presets import load_yaml, preset_names

    for name in preset_names():
        cfg = cilkit.resolve([load_yaml(name), {"data": {"root": str(tmp_path)}}])
        if name.startswith("papers/seq-mnist/"):
            assert cfg.scenario.mode == "online" and cfg.train.batch_size == 10 and cfg.model.init == "xavier"
