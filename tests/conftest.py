import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _two_threads():
    """CI has 2 cores; keep the tests' own thread count the same everywhere."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def run_cut_and_resumed(tmp_path, monkeypatch):
    """``f(cfg, cut_at=2) -> (full, partial, resumed)``: the metrics of an uninterrupted run, of the same run
    stopped by a KeyboardInterrupt at the start of task ``cut_at``, and of that run after ``cilkit run --resume``."""
    import json

    from cilkit.cli import main
    from cilkit.driver import TaskDriver
    from cilkit.experiment import Experiment

    def run(cfg, cut_at: int = 2):
        full = Experiment(cfg, tmp_path / "full", progress="off").execute()
        original = TaskDriver.run_task

        def interrupted(self, task):
            if task.index == cut_at:
                raise KeyboardInterrupt
            return original(self, task)

        monkeypatch.setattr(TaskDriver, "run_task", interrupted)
        with pytest.raises(KeyboardInterrupt):
            Experiment(cfg, tmp_path / "cut", progress="off").execute()
        monkeypatch.setattr(TaskDriver, "run_task", original)
        partial = json.loads((tmp_path / "cut" / "metrics.json").read_text())
        assert main(["run", "--resume", str(tmp_path / "cut"), "--progress", "off"]) == 0
        resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
        return full, partial, resumed

    return run
