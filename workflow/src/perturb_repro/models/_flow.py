"""Pieces the flow-matching models share (PRiMeFlow in gene/PCA space, scLDM in a latent space): Euler
integration (the pipeline's sampler) and the adaptive dopri5 of torchdiffeq (scLDM.CD4's, as an option),
classifier-free guidance, seeds derived from (seed, step) so a resumed run draws the same numbers."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import anndata as ad
import numpy as np
import torch
from torch import nn


def param_at(params: Mapping[str, Any], path: str, default: Any = None) -> Any:
    """``params["a"]["b"]`` for ``path="a.b"``; ``default`` where any level is missing."""
    node: Any = params
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def label_seed(seed: int, label: str) -> int:
    return step_seed(seed, zlib.crc32(label.encode()))


def covariate_ids(adata: ad.AnnData, columns: list[str], values: list[list[str]]) -> np.ndarray:
    """Per cell, the index of its value in each covariate's train vocabulary; -1 for a value unseen in training."""
    out = np.full((adata.n_obs, max(len(columns), 1)), -1, dtype=np.int64)
    for k, (column, vals) in enumerate(zip(columns, values)):
        if column not in adata.obs:
            raise ValueError(f"covariate column '{column}' (params.covariates) is not in obs: {list(adata.obs.columns)}")
        lookup = {v: i for i, v in enumerate(vals)}
        out[:, k] = [lookup.get(v, -1) for v in adata.obs[column].astype(str)]
    return out


def guided_velocity(field: nn.Module, x, t, tok, cov, w: float):
    """Classifier-free guidance v_u + w (v_c - v_u). w == 1 is the conditional field itself (no unconditional
    pass). ``field(x, t, tok, cov, drop=mask)`` drops the condition of the rows where ``mask`` is set."""
    if w == 1.0:
        return field(x, t, tok, cov)
    b = x.shape[0]
    drop = torch.cat([torch.zeros(b, dtype=torch.bool, device=x.device), torch.ones(b, dtype=torch.bool, device=x.device)])
    v = field(torch.cat([x, x]), torch.cat([t, t]), torch.cat([tok, tok]), torch.cat([cov, cov]), drop=drop)
    v_cond, v_uncond = v[:b], v[b:]
    return v_uncond + w * (v_cond - v_uncond)


def euler_integrate(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, steps: int,
                    t0: float = 0.0, t1: float = 1.0) -> torch.Tensor:
    """Explicit Euler: x_{k+1} = x_k + dt f(x_k, t_k), t_k = t0 + k dt, dt = (t1 - t0) / steps."""
    x = x0
    dt = (t1 - t0) / steps
    for k in range(steps):
        t = torch.full((x.shape[0],), t0 + k * dt, dtype=x.dtype, device=x.device)
        x = x + dt * f(x, t)
    return x


TORCH_SOLVERS = ("euler", "dopri5")


def integrate(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, sampling: Mapping[str, Any],
              default_steps: int = 100) -> torch.Tensor:
    """Solve dx/dt = f(x, t) from t = 0 to 1 with the sampler ``sampling`` names.

    ``solver: euler`` (default): ``steps`` fixed Euler steps. ``solver: dopri5``: torchdiffeq's adaptive
    Dormand-Prince 5(4) with ``rtol``/``atol`` (defaults 1e-3 / 1e-6, scLDM.CD4's ``sample_ode``), evaluated on
    upstream's output grid linspace(0, 1, steps) (the solver's own steps do not depend on the grid; the value
    at t = 1 is the one returned). torchdiffeq measures the error over the whole tensor, so every row of a
    batch shares one step-size sequence (as upstream): a row's result depends a little on its batch."""
    solver = str(sampling.get("solver") or "euler")
    steps = int(sampling.get("steps") or default_steps)
    if solver == "euler":
        return euler_integrate(f, x0, steps)
    if solver == "dopri5":
        from torchdiffeq import odeint

        grid = torch.linspace(0.0, 1.0, max(steps, 2), dtype=x0.dtype, device=x0.device)
        rtol, atol = float(sampling.get("rtol", 1e-3)), float(sampling.get("atol", 1e-6))
        return odeint(lambda t, x: f(x, t.expand(x.shape[0])), x0, grid, method="dopri5", rtol=rtol, atol=atol)[-1]
    raise ValueError(f"sampling.solver must be one of {TORCH_SOLVERS} for this model, not {solver!r}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
