"""The one training loop every PyTorch model runs through.

A model file holds its network, its loss (:class:`TrainTask`) and its sampling; the :class:`Trainer` owns
the rest: device placement, data-parallel processes (DDP: NCCL on GPUs, gloo on CPU), mixed precision
(fp16 with a grad scaler, bf16, TF32), gradient accumulation and clipping, EMA, LR schedules, a checkpoint
every N steps and on SIGTERM/SIGUSR1, resume, a progress bar and the train log.

Why our own loop over torch's parts rather than Lightning or accelerate: the bar is a resumed run that is
*bit-identical* to an uninterrupted one, at any step (preemption lands mid-epoch), and Snakemake owns
requeueing. Lightning resumes mid-epoch only approximately (its fault-tolerant mode was removed in 2.0), and
accelerate adds a process-global state and a launcher around the same torch calls used here
(``DistributedDataParallel``, ``torch.autocast``, ``torch.amp.GradScaler``, ``clip_grad_norm_``).

Randomness: before each micro-batch the trainer seeds torch's global generators from (seed, step, micro,
rank) inside ``fork_rng``, so dropout and any ``torch.rand*`` a task draws depend on the step alone —
which is what makes resume exact. A task that must match a one-process run under DDP draws its random
numbers for the *global* batch and keeps its shard's rows (:meth:`Shard.take`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from .distributed import World, current_world, init_process_group
from .io import atomic_path, write_text
from .training import Preempted, StopFlag, TrainLog

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.csv"
REPORT_FILE = "trainer.json"


def step_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (seed, step, micro, …): stable across runs and machines."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class TrainerConfig:
    """How to train, independent of what is trained. Models build it from their preset's keys."""

    total_steps: int | None  # None: the task decides when to stop (epoch loops with early stopping)
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end and on a signal
    precision: str = "fp32"
    grad_clip: float | None = None
    grad_accum_steps: int = 1
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    deterministic_rng: bool = True  # seed torch's generators per (seed, step, micro, rank)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"training precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.grad_accum_steps < 1:
            raise ValueError("grad_accum_steps must be >= 1")


@dataclass(frozen=True)
class Shard:
    """This process's share of every global batch."""

    rank: int
    world: int
    device: torch.device

    def bounds(self, n: int) -> tuple[int, int]:
        if n % self.world:
            raise ValueError(
                f"a global batch of {n} does not split evenly over {self.world} processes: choose a batch size "
                f"divisible by nodes x GPUs (the preset states the global batch; per-device = global / world size)"
            )
        per = n // self.world
        return self.rank * per, (self.rank + 1) * per

    def take(self, x):
        """Rows of a global-batch array/tensor (or list of them) that belong to this process."""
        if isinstance(x, (list, tuple)):
            return type(x)(self.take(v) for v in x)
        lo, hi = self.bounds(len(x))
        return x[lo:hi]


class TrainTask:
    """What a model gives the trainer: the loss of one micro-batch, and what happens between steps."""

    def loss(self, module: nn.Module, step: int, micro: int, shard: Shard) -> torch.Tensor:
        """Mean loss of this process's share of micro-batch ``micro`` of update ``step``."""
        raise NotImplementedError

    def after_step(self, module: nn.Module, steps_done: int) -> bool:
        """Called after every update (``steps_done`` updates so far); return True to stop training."""
        return False

    def log_fields(self) -> dict[str, Any]:
        """Counters written beside the loss in every train-log row (the same keys on every call)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class EMA:
    """Exponential moving average of the weights (ema_pytorch-style: a copy until ``start``, updated every
    ``every`` steps)."""

    def __init__(self, module: nn.Module, decay: float, every: int = 1, start: int = 0):
        self.decay, self.every, self.start = float(decay), max(1, int(every)), int(start)
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def update(self, module: nn.Module, step: int) -> None:
        if (step + 1) % self.every:
            return
        with torch.no_grad():
            for k, v in module.state_dict().items():
                if step < self.start or not v.is_floating_point():
                    self.shadow[k].copy_(v)
                else:
                    self.shadow[k].lerp_(v, 1 - self.decay)


@dataclass
class FitResult:
    steps: int
    module: nn.Module  # unwrapped, on its training device
    ema: dict[str, torch.Tensor] | None = None
    report: dict[str, Any] = field(default_factory=dict)


def resolve_device(choice: str, world: World) -> torch.device:
    choice = str(choice or "auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        return torch.device("cuda", world.local_rank % max(1, torch.cuda.device_count()))
    return torch.device(choice)


class Trainer:
    """Runs a :class:`TrainTask` to the end (or to a signal), checkpointing into ``checkpoint_dir``."""

    def __init__(self, config: TrainerConfig, checkpoint_dir: Path, *, kind: str, fingerprint: Any = None,
                 state_file: str = STATE_FILE, log_file: str = LOG_FILE, report_file: str = REPORT_FILE) -> None:
        self.config = config
        self.dir = Path(checkpoint_dir)
        self.kind = kind
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str)) if fingerprint is not None else None
        self.state_path = self.dir / state_file
        self.log_path = self.dir / log_file
        self.report_path = self.dir / report_file
        self.world = current_world()
        self.device = resolve_device(config.device, self.world)
        self.distributed = False

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    # -- precision

    @property
    def precision_used(self) -> str:
        """fp16/bf16/TF32 apply on GPUs; CPU runs stay fp32 (and bit-reproducible)."""
        return self.config.precision if self.device.type == "cuda" else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        p = self.precision_used
        if p in ("fp16", "bf16"):
            return torch.autocast(device_type="cuda", dtype=torch.float16 if p == "fp16" else torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def seeded(self, step: int, micro: int) -> Iterator[None]:
        if not self.config.deterministic_rng:
            yield
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            s = step_seed(self.config.seed, step, micro, self.world.rank)
            torch.default_generator.manual_seed(s)  # torch.manual_seed also probes every backend: slow
            if devices:
                torch.cuda.manual_seed(s)
            yield

    # -- state

    def _check_owner(self, saved: Mapping[str, Any]) -> None:
        if saved.get("kind") != self.kind:
            raise ValueError(f"{self.state_path} holds a '{saved.get('kind')}' training state, not '{self.kind}'; "
                             "remove it to start over")
        if self.fingerprint is not None and saved.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{self.state_path} was written for other params/data; remove it to start over")

    def _barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (signals reach ranks at different steps)."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _mean(self, value: float) -> float:
        if not self.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64 if self.device.type == "cpu" else torch.float32, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world.size

    # -- the loop

    def fit(self, module: nn.Module, optimizer: torch.optim.Optimizer, task: TrainTask, *,
            scheduler: Any = None, ema: EMA | None = None, stateful: Mapping[str, Any] | None = None) -> FitResult:
        """Train ``module`` (already built, on any device) with ``optimizer``; ``scheduler`` steps after every
        update; ``stateful`` objects (anything with state_dict/load_state_dict, e.g. a plateau scheduler the
        task steps itself) are saved and restored with the rest."""
        cfg = self.config
        self.dir.mkdir(parents=True, exist_ok=True)
        if cfg.precision == "tf32" and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        module.to(self.device)
        _move_optimizer_state(optimizer, self.device)
        self.distributed = init_process_group(self.world, self.device.type)
        scaler = torch.amp.GradScaler("cuda", enabled=self.precision_used == "fp16")
        stateful = dict(stateful or {})
        start, finished = 0, False
        if self.state_path.exists():
            saved = torch.load(self.state_path, map_location="cpu", weights_only=False)
            self._check_owner(saved)
            module.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            _move_optimizer_state(optimizer, self.device)
            if scheduler is not None and saved.get("scheduler") is not None:
                scheduler.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            if ema is not None and saved.get("ema") is not None:
                ema.shadow = {k: v.to(self.device) for k, v in saved["ema"].items()}
            for name, obj in stateful.items():
                obj.load_state_dict(saved["stateful"][name])
            task.load_state_dict(saved.get("task") or {})
            start, finished = int(saved["step"]), bool(saved.get("done"))
        if ema is not None:
            ema.shadow = {k: v.to(self.device) for k, v in ema.shadow.items()}

        net: nn.Module = module
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        shard = Shard(self.world.rank, self.world.size, self.device)

        def save(step: int, done: bool) -> None:
            if self.is_main:
                payload = {
                    "kind": self.kind, "fingerprint": self.fingerprint, "step": step, "done": done,
                    "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "ema": ema.shadow if ema is not None else None,
                    "stateful": {name: obj.state_dict() for name, obj in stateful.items()},
                    "task": task.state_dict(),
                }
                with atomic_path(self.state_path) as tmp:
                    torch.save(payload, tmp)
                write_text(json.dumps({"step": step, "done": done}), self.state_path.with_suffix(".json"))
            self._barrier()

        total = cfg.total_steps
        # a run stopped by its task (early stopping) stays stopped; a step budget may be raised and resumed
        done = (finished and total is None) or (total is not None and start >= total)
        log = TrainLog(self.log_path, start, tuple(task.log_fields())) if self.is_main else None
        bar = _progress(cfg.progress and self.is_main, total, start, self.kind)
        step = start
        try:
            with StopFlag() as flag:
                net.train()
                while not done:
                    optimizer.zero_grad(set_to_none=True)
                    value = 0.0
                    for m in range(cfg.grad_accum_steps):
                        sync = m == cfg.grad_accum_steps - 1
                        ctx = net.no_sync() if (self.distributed and not sync) else contextlib.nullcontext()
                        with ctx, self.seeded(step, m):
                            with self.autocast():
                                loss = task.loss(net, step, m, shard)
                            loss = loss.float() / cfg.grad_accum_steps
                            scaler.scale(loss).backward()
                        value += float(loss.detach())
                    if cfg.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(module.parameters(), float(cfg.grad_clip))
                    scaler.step(optimizer)
                    scaler.update()
                    if scheduler is not None:
                        scheduler.step()
                    if ema is not None:
                        ema.update(module, step)
                    value = self._mean(value)
                    if log is not None:
                        log.add(step, value, task.log_fields())
                    step += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{value:.4g}", refresh=False)
                    done = task.after_step(net, step) or (total is not None and step >= total)
                    signalled = self._any(flag.raised is not None)
                    if done or signalled or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                        if log is not None:
                            log.flush()
                        save(step, done)
                    if signalled and not done:
                        raise Preempted(f"signal at step {step}; state saved, rerun to resume")
                if not self.state_path.exists():
                    save(step, True)
        finally:
            if log is not None:
                log.close()
            if bar is not None:
                bar.close()
        report = {
            "kind": self.kind, "steps": step, "device": str(self.device),
            "gpu_model": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "precision_requested": cfg.precision, "precision_used": self.precision_used,
            "world_size": self.world.size, "grad_accum_steps": cfg.grad_accum_steps, "grad_clip": cfg.grad_clip,
            "backend": ("nccl" if self.device.type == "cuda" else "gloo") if self.distributed else None,
            "config": asdict(cfg),
        }
        if self.is_main:
            write_text(json.dumps(report, indent=2), self.report_path)
        return FitResult(step, module, ema.shadow if ema is not None else None, report)

    def close(self) -> None:
        """Leave the process group (after the model wrote its final files)."""
        self._barrier()
        if self.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.distributed = False


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)


def _progress(enabled: bool, total: int | None, start: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # the job log is a file: a line every 30 s, not a redraw per step
    return tqdm(total=total, initial=start, desc=desc, file=sys.stderr, mininterval=30, dynamic_ncols=False,
                ascii=True, leave=True)


def lambda_schedule(optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-update LR multiplier: the LR of update ``s`` is base × ``factor(s)``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)


def global_batch(total: int, world: World | None = None) -> int:
    """Per-device batch for a preset's global batch (the DDP contract: per-device = global / world size)."""
    world = world or current_world()
    if total % world.size:
        raise ValueError(f"global batch {total} does not split over {world.size} processes")
    return total // world.size


__all__ = ["EMA", "FitResult", "Shard", "TrainTask", "Trainer", "TrainerConfig", "lambda_schedule", "step_seed",
           "global_batch"]
