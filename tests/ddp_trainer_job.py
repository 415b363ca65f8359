"""A tiny job the data-parallel tests start in each process (``perturb_repro.distributed.launch`` imports it by name)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from perturb_repro import trainer as T


class _RegressionTask(T.TrainTask):
    """MSE of a small MLP on fixed synthetic data; the global batch is drawn from (seed, step, micro)."""

    def __init__(self, seed: int, global_batch: int):
        rng = np.random.default_rng(0)
        self.x = torch.as_tensor(rng.normal(size=(512, 8)), dtype=torch.float32)
        self.y = torch.as_tensor(np.sin(self.x.numpy().sum(1, keepdims=True)), dtype=torch.float32)
        self.seed, self.global_batch = seed, global_batch

    def loss(self, module, step, micro, shard):
        rows = np.random.default_rng(T.step_seed(self.seed, step, micro)).integers(0, len(self.x), self.global_batch)
        rows = shard.take(torch.as_tensor(rows))
        return nn.functional.mse_loss(module(self.x[rows]), self.y[rows])


def train_tiny(out_dir: str, steps: int, global_batch: int, seed: int = 0, accum: int = 1, preempt_after: int | None = None):
    if preempt_after is not None:
        from fakes import SignalAfter  # tests/ is on the workers' PYTHONPATH

        T.StopFlag = lambda: SignalAfter(preempt_after)
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    trainer = T.Trainer(T.TrainerConfig(total_steps=steps, seed=seed, checkpoint_every=3, progress=False,
                                        grad_accum_steps=accum, grad_clip=1.0, device="cpu"),
                        Path(out_dir), kind="tiny", fingerprint={"global_batch": global_batch})
    result = trainer.fit(net, opt, _RegressionTask(seed, global_batch))
    if trainer.is_main:
        torch.save(result.module.state_dict(), Path(out_dir) / "weights.pt")
    trainer.close()


def fail_on_rank(out_dir: str, failing_rank: int):
    """One rank raises at once; the other joins the process group and waits for it (as a rank whose peer died in
    a collective would): only the launcher stopping it ends the job."""
    import os

    from perturb_repro.distributed import current_world, init_process_group

    world = current_world()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{world.rank}.pid").write_text(str(os.getpid()))
    if world.rank == failing_rank:
        import time

        while len(list(Path(out_dir).glob("rank*.pid"))) < world.size:  # every rank is up before this one dies
            time.sleep(0.05)
        raise RuntimeError(f"rank {world.rank} fails on purpose")
    init_process_group(world, "cpu")  # blocks: the failing rank never joins
