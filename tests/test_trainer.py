"""The shared trainer's EMA against the closed form of an exponential moving average of the weights."""

from __future__ import annotations

import torch
from torch import nn

from perturb_repro.trainer import EMA, Trainer, TrainerConfig, TrainTask


class _Regression(TrainTask):
    """Least squares on fixed data; records the weights after every update."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
        self.weights: list[torch.Tensor] = []

    def loss(self, module, step, micro, shard):
        return ((module(self.x) - self.y) ** 2).mean()

    def after_step(self, module, steps_done):
        self.weights.append(module.weight.detach().clone())
        return False


def _fit(tmp_path, decay, every=1, start=0, steps=6):
    torch.manual_seed(1)
    module = nn.Linear(3, 1)
    w0 = module.weight.detach().clone()
    task = _Regression()
    trainer = Trainer(TrainerConfig(total_steps=steps, device="cpu", progress=False), tmp_path / "ckpt", kind="ema-test")
    result = trainer.fit(module, torch.optim.SGD(module.parameters(), lr=0.1), task,
                         ema=EMA(module, decay, every=every, start=start))
    return w0, task.weights, result.ema["weight"]


def test_ema_is_the_exponential_average_of_the_weights(tmp_path):
    decay, steps = 0.7, 6
    w0, ws, shadow = _fit(tmp_path, decay, steps=steps)
    assert len(ws) == steps and not torch.equal(ws[0], ws[-1])  # the weights moved
    # closed form: decay^N w0 + sum_s (1 - decay) decay^(N-1-s) w_s
    expected = decay**steps * w0 + sum((1 - decay) * decay ** (steps - 1 - s) * w for s, w in enumerate(ws))
    torch.testing.assert_close(shadow, expected, rtol=1e-6, atol=1e-7)


def test_ema_copies_the_weights_until_start_then_averages_every_k(tmp_path):
    decay, start, every, steps = 0.5, 2, 2, 6
    _, ws, shadow = _fit(tmp_path, decay, every=every, start=start, steps=steps)
    # updates at steps 1, 3, 5 (every 2); step 1 < start copies w_1, then EMA with w_3 and w_5
    expected = decay**2 * ws[1] + (1 - decay) * decay * ws[3] + (1 - decay) * ws[5]
    torch.testing.assert_close(shadow, expected, rtol=1e-6, atol=1e-7)
