"""Pieces the flow-matching models share (PRiMeFlow in gene/PCA space, scLDM in a latent space): Euler
integration, classifier-free guidance, seeds derived from (seed, step) so a resumed run draws the same numbers."""

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


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
