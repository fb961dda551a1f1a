import contextlib
import os

import pytest
import torch

from torchgraft.train.callbacks import Callback

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and stay fast when the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def invoke_cli(argv, capsys):
    """(exit code, stdout, stderr, seconds) of one in-process `torchgraft` CLI call."""
    import time

    from torchgraft.cli import main

    t0 = time.perf_counter()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err, time.perf_counter() - t0


@contextlib.contextmanager
def interrupt_after_step(monkeypatch, step: int):
    """Within the block, the Trainer raises KeyboardInterrupt right after finishing `step` (a crash
    between checkpoints); the patch is undone when the block ends."""
    from torchgraft.train.trainer import Trainer

    orig = Trainer._after_step

    def crash(self, out):
        orig(self, out)
        if self.state.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_after_step", crash)
    try:
        yield
    finally:
        monkeypatch.setattr(Trainer, "_after_step", orig)


class InitialWeights(Callback):
    """A training callback that keeps a copy of the weights a run starts from (for assert_same_run)."""

    def on_train_start(self, trainer) -> None:
        state = trainer.model.state_dict()  # FSDP: DTensor shards, gathered into full tensors
        self.state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                      for k, v in state.items()}


def assert_same_run(got: dict, want: dict, start: dict, tol: float) -> None:
    """Two SGD runs of the same steps agree up to `tol` (the relative difference of their gradients,
    torchgraft.testing) of how far the weights moved from `start`: w moves by lr * g. (Adam divides
    each element by its own gradient's size, so a rounding-level gradient, like a key bias's, can
    move either way: compare Adam runs bitwise, or not at all.)"""
    from torchgraft.testing import assert_close_computed

    moved = max((want[k] - start[k]).abs().max().item() for k in want if want[k].is_floating_point())
    for k, v in want.items():
        assert_close_computed(got[k], v, tol, scale=moved, msg=k)

