#!/usr/bin/env python
"""GPU benchmark: the four paper-scale training steps beside the cards' own speed figures, in one go.

    .venv-gpu/bin/python workflow/bench/bench_gpu.py                 # one GPU node, <= ~8 min
    .venv/bin/python workflow/bench/bench_gpu.py --quick             # CPU smoke test: tiny presets, < 1 min

Rows (presets read from config/presets/<type>.yaml; only the cards' reference figures live in this file):
  1. CellFlow `paper`        ms / iteration (cellflow-tools' own step function, via bench.py's bench_train)
  2. scGPT `paper_replogle`  training cells / s (TransformerGenerator, batch x max_seq_len tokens)
  3. PRiMeFlow `paper_norman19` U-Net ms / micro-batch step at the paper's per-GPU batch size
  4. scLDM `paper`           DiT ms / step at the card's batch size (flow stage, in latent space)
Each is printed beside the card's figure with ratio = measured throughput / card throughput (> 1: faster than
the card), and with the precision used (fp32 / TF32 / bf16 / fp16 as the preset asks; autocast runs on CUDA only,
as in the models). Inputs are synthetic, built in memory; imports are torch, JAX, cellflow-tools (and their deps)
and the project's model modules, never snakemake, scanpy or cell-eval (checked, reported as `forbidden_imports`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# JAX would otherwise take 75 % of the GPU at import, leaving torch too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflow" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FORBIDDEN = ("snakemake", "scanpy", "cell_eval")
CONTROL = "ctrl"

# ------------------------------------------------------------------ the cards' figures (the reference)
# CellFlow-Norman card: 200,000 iterations, wall clock 0.7 h on one H100 PCIe.
CELLFLOW_CARD = {"iterations": 200_000, "hours": 0.7, "gpu": "1x H100 PCIe"}
# scGPT-Replogle card: 5,400,630 training cells seen in 393.6 min (~6.56 h) on one H100 PCIe (80 GB).
SCGPT_CARD = {"cells": 5_400_630, "minutes": 393.6, "gpu": "1x H100 PCIe"}
# scLDM.CD4 card: flow matching 150 epochs on 4 nodes x 8 H100 in ~18 h; ~14.5M cells of which ~1.1M validation and
# ~2.4M test, so ~11.0M train cells. Per GPU: 150 * 11.0M / (18 h * 32) cells/s (includes DDP and data loading).
SCLDM_CARD = {"epochs": 150, "train_cells": 14.5e6 - 1.1e6 - 2.4e6, "hours": 18.0, "gpus": 32, "gpu": "32x H100",
              "condition_classes": (10_571, [4, 3])}  # guide targets; donors, time points
# PRiMeFlow paper: Appendix E gives batch sizes and GPU counts, no training time: no reference figure.


def card_figures() -> dict:
    return {
        "cellflow_ms_per_it": CELLFLOW_CARD["hours"] * 3600e3 / CELLFLOW_CARD["iterations"],
        "scgpt_cells_per_s": SCGPT_CARD["cells"] / (SCGPT_CARD["minutes"] * 60),
        "scldm_cells_per_s_per_gpu": SCLDM_CARD["epochs"] * SCLDM_CARD["train_cells"]
        / (SCLDM_CARD["hours"] * 3600 * SCLDM_CARD["gpus"]),
    }


def load_presets(kind: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "config" / "presets" / f"{kind}.yaml").read_text())


def dataset_config() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


# ------------------------------------------------------------------ torch helpers
def precision_of(training: dict) -> str:
    """The precision a preset asks for, with the models' keys: `precision`, scGPT's `amp` (fp16 + GradScaler),
    PRiMeFlow/scLDM's `mixed_precision` (bf16)."""
    if training.get("precision"):
        return str(training["precision"])
    if "amp" in training:
        return "fp16" if training["amp"] else "fp32"
    return "bf16" if training.get("mixed_precision") else "fp32"


def precision_label(requested: str, device) -> str:
    import torch

    if device.type != "cuda":
        return f"fp32 (preset {requested}: CUDA only)" if requested != "fp32" else "fp32"
    if requested in ("fp16", "bf16"):
        return f"{requested} autocast" + (" + GradScaler" if requested == "fp16" else "")
    tf32 = requested == "tf32" or torch.backends.cuda.matmul.allow_tf32
    return "TF32" if tf32 else "fp32 (TF32 off)"


def timed_loop(step, sync, warmup: int, steps: int, budget_s: float) -> dict:
    """Run `warmup` untimed steps, then up to `steps` timed ones (stopping early once `budget_s` is spent)."""
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        step(warmup + done)
        done += 1
        if time.perf_counter() - t0 > budget_s:
            sync()
            if time.perf_counter() - t0 > budget_s:
                break
    sync()
    total = time.perf_counter() - t0
    return {"warmup_steps": warmup, "warmup_seconds": warm_s, "timed_steps": done, "timed_seconds": total,
            "seconds_per_step": total / done}


def torch_trainer(net, params, optimizer_kind: str, lr: float, precision: str, clip: float | None, device, loss_fn):
    """One optimiser step like the shared trainer's: autocast (fp16 with a GradScaler, or bf16), clip, step."""
    import torch

    net.to(device).train()
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer_kind]
    opt = cls(net.parameters(), lr=lr)
    cuda = device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if cuda and precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and precision == "fp16")

    def step(i: int) -> None:
        with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=cuda and dtype is not None):
            loss = loss_fn(net, i)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()

    return step


def _sync(device):
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


BATCH_CAP: int | None = None


def capped(batch: int) -> int:
    return min(batch, BATCH_CAP) if BATCH_CAP else batch


def n_params(net) -> int:
    return int(sum(p.numel() for p in net.parameters()))


# ------------------------------------------------------------------ synthetic cells
def synthetic_cells(n_genes: int, n_single: int, n_double: int, cells_per_condition: int, n_controls: int,
                    covariates: dict[str, int], seed: int = 0):
    """AnnData of log-expression-like cells: controls plus single ('Gk+ctrl') and double ('Gi+Gj') conditions."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from perturb_repro.data.source import CONDITION, IS_CONTROL

    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(max(n_single, 2))]
    labels = [f"{g}+{CONTROL}" for g in genes[:n_single]]
    labels += [f"{genes[i % len(genes)]}+{genes[(i + 1) % len(genes)]}" for i in range(n_double)]
    cond = [CONTROL] * n_controls + [c for c in labels for _ in range(cells_per_condition)]
    x = np.log1p(rng.gamma(0.3, 2.0, size=(len(cond), n_genes))).astype(np.float32)
    obs = pd.DataFrame({CONDITION: cond}, index=[f"c{i}" for i in range(len(cond))])
    obs[IS_CONTROL] = obs[CONDITION] == CONTROL
    for column, k in covariates.items():
        obs[column] = pd.Categorical([f"{column}{v}" for v in rng.integers(0, k, len(cond))])
    adata = ad.AnnData(X=x, obs=obs)
    adata.var_names = [f"gene{i}" for i in range(n_genes)]
    return adata, genes


def synthetic_context(genes: list[str], esm_dim: int, pca_dim: int | None, n_genes: int, seed: int = 0):
    import numpy as np

    from perturb_repro.data.pca import PCABasis
    from perturb_repro.models.base import ModelContext

    rng = np.random.default_rng(seed + 1)
    emb = {g: rng.standard_normal(esm_dim).astype(np.float32) for g in genes}
    k = pca_dim or min(n_genes, 8)
    comps = np.zeros((k, n_genes), dtype=np.float32)
    comps[np.arange(k), np.arange(k)] = 1.0  # identity on the first k genes: cells are drawn in PCA space
    pca = PCABasis(comps, np.zeros(n_genes, np.float32), np.ones(k, np.float32))
    return ModelContext("bench_gpu", CONTROL, pca, emb, 0)


ESM2_DIMS = {"esm2_t6_8M_UR50D": 320, "esm2_t12_35M_UR50D": 480, "esm2_t30_150M_UR50D": 640,
             "esm2_t33_650M_UR50D": 1280, "esm2_t36_3B_UR50D": 2560, "esm2_t48_15B_UR50D": 5120}


def esm2_dim(cfg: dict, entry: str | None = None) -> int:
    """Width of the gene embedding a model entry conditions on (its `gene_embedding`, else `esm2.embedding`;
    configs without an `esm2.embeddings` block name one `esm2.model`)."""
    esm2 = cfg["esm2"]
    name = (cfg["models"].get(entry, {}) if entry else {}).get("gene_embedding") or esm2.get("embedding")
    model = esm2["embeddings"][name]["model"] if name and "embeddings" in esm2 else esm2["model"]
    return ESM2_DIMS[str(model).split("/")[-1]]


# ------------------------------------------------------------------ 1. CellFlow
def bench_cellflow(preset: str, quick: bool, steps: int, warmup: int, budget: float) -> dict:
    import jax

    from bench import bench_train  # workflow/bench/bench.py: build_cellflow + train_steps, per-step timestamps

    cfg = dataset_config()
    pca_dim = int(cfg["datasets"]["norman"]["pca"]["n_components"])
    params = load_presets("cellflow")[preset]
    batch = capped(int(params["training"]["batch_size"]))
    # each condition holds more cells than a batch, as Norman's (cellflow's sampler draws per condition)
    train, genes = synthetic_cells(pca_dim, 6 if quick else 24, 2 if quick else 8, batch + 64,
                                   batch + 64, {}, 0)
    context = synthetic_context(genes, esm2_dim(cfg, "cellflow"), pca_dim, pca_dim)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_cf_") as tmp:
        _, r = bench_train(train, context, preset, warmup, steps, batch, Path(tmp))
    prec = str(jax.config.jax_default_matmul_precision or "default")
    backend = jax.default_backend()
    ms = 1e3 * r["steady_seconds_per_step"]
    card = card_figures()["cellflow_ms_per_it"]
    return {
        "model": "CellFlow", "preset": preset, "batch": batch, "device": f"jax {backend} ({jax.devices()[0].device_kind})",
        "precision": ("TF32 (fp32, XLA default matmuls)" if backend == "gpu" and prec == "default"
                      else "fp32" if prec == "default" else f"fp32 (matmul precision {prec})"),
        "measured": ms, "unit": "ms/it", "card": card, "card_unit": "ms/it",
        "card_note": f"{CELLFLOW_CARD['iterations']:,} it in {CELLFLOW_CARD['hours']} h, {CELLFLOW_CARD['gpu']}",
        "ratio": card / ms, "n_params": r["n_params_vf"], "projected_hours_card_budget":
            ms * int(params["training"]["num_iterations"]) / 3600e3, "detail": r,
    }


# ------------------------------------------------------------------ 2. scGPT
def bench_scgpt(preset: str, device, steps: int, warmup: int, budget: float) -> dict:
    import torch

    from perturb_repro.models.scgpt import build_network

    p = load_presets("scgpt")[preset]
    model, tr = p["model"], p["training"]
    if p.get("pretrained_dir"):  # the whole-human checkpoint's vocabulary (its args.json sizes equal the preset's)
        ntoken = int(json.loads((ROOT / "tests" / "data" / "scgpt_whole_human_layout.json").read_text())["config"]["ntoken"])
    else:
        ntoken = 503  # tiny: a fresh vocabulary over the demo's 500 genes + special tokens
    pad = ntoken - 3
    arch = {"ntoken": ntoken, "d_model": int(model["d_model"]), "nhead": int(model["nhead"]), "d_hid": int(model["d_hid"]),
            "nlayers": int(model["nlayers"]), "nlayers_cls": int(model.get("nlayers_cls", 3)), "n_cls": int(model.get("n_cls", 1)),
            "dropout": float(model.get("dropout", 0.0)), "pad_token_id": pad, "pert_pad_id": int(model.get("pert_pad_id", 2))}
    torch.manual_seed(0)
    net = build_network(arch)
    batch, seq = capped(int(tr["batch_size"])), int(p["data"]["max_seq_len"])  # include_zero_gene all: max_seq_len genes per batch
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, pad, (batch, seq), generator=g).to(device)
    values = torch.rand(batch, seq, generator=g).mul(4).to(device)
    flags = torch.zeros(batch, seq, dtype=torch.long)
    flags[:, :2] = 1
    flags = flags.to(device)
    target = torch.rand(batch, seq, generator=g).mul(4).to(device)
    precision = precision_of(tr)

    def loss_fn(n, i):
        pred = n(src, values, flags, None, None)
        return torch.nn.functional.mse_loss(pred.float(), target)

    step = torch_trainer(net, list(net.parameters()), "adam", float(tr["lr"]), precision,
                         float(tr.get("grad_clip_norm") or 0) or None, device, loss_fn)
    r = timed_loop(step, _sync(device), warmup, steps, budget)
    cells = batch / r["seconds_per_step"]
    card = card_figures()["scgpt_cells_per_s"]
    return {"model": "scGPT", "preset": preset, "batch": batch, "device": str(device),
            "precision": precision_label(precision, device), "measured": cells, "unit": "cells/s",
            "card": card, "card_unit": "cells/s",
            "card_note": f"{SCGPT_CARD['cells']:,} cells in {SCGPT_CARD['minutes']} min, {SCGPT_CARD['gpu']}",
            "ratio": cells / card, "n_params": n_params(net), "tokens_per_cell": seq,
            "ms_per_step": 1e3 * r["seconds_per_step"], "detail": r}


# ------------------------------------------------------------------ 3. PRiMeFlow
def bench_primeflow(preset: str, quick: bool, device, steps: int, warmup: int, budget: float) -> dict:
    import torch

    from perturb_repro.models import primeflow as pf

    p = load_presets("primeflow")[preset]
    tr = p["training"]
    cfg = dataset_config()
    n_genes = 500 if quick else int(cfg["datasets"]["norman19"]["preprocess"]["n_top_genes"])
    covs = {c: 3 for c in (p.get("covariates") or [])}
    train, genes = synthetic_cells(n_genes, 12, 12, 4, 16, covs, 0)
    context = synthetic_context(genes, esm2_dim(cfg), None, n_genes)
    spec = pf.build_spec(train, context, p)
    field = pf.build_field(spec, 0)
    batch = capped(int(tr["batch_size"]))  # per GPU, as Appendix E
    g = torch.Generator().manual_seed(0)
    x1 = torch.rand(batch, n_genes, generator=g).mul(3).to(device)
    tok = torch.randint(0, len(spec["vocab"]), (batch, spec["max_perts"]), generator=g).to(device)
    cov = torch.zeros(batch, len(spec["covariates"]), dtype=torch.long).to(device)
    flow = p.get("flow", {})
    kind, sigma = str(flow.get("interpolation", "linear")).lower(), float(flow.get("sigma", 0.0))
    p_uncond = float(flow.get("prob_unconditional", 0.0))
    precision = precision_of(tr)

    def loss_fn(n, i):
        x0 = torch.randn_like(x1)
        t = torch.rand(batch, device=device)
        noise = torch.randn_like(x1) if sigma > 0 else None
        drop = torch.rand(batch, device=device) < p_uncond
        xt, ut = pf.interpolate(x0, x1, t, kind, sigma, noise)
        return torch.nn.functional.mse_loss(n(xt, t, tok, cov, drop=drop).float(), ut)

    step = torch_trainer(field, list(field.parameters()), str(tr.get("optimizer", "adam")), float(tr["learning_rate"]),
                         precision, float(tr.get("grad_clip") or 0) or None, device, loss_fn)
    r = timed_loop(step, _sync(device), warmup, steps, budget)
    ms = 1e3 * r["seconds_per_step"]
    micro = int(tr.get("num_gpus", 1)) * int(tr.get("grad_accum_steps", 1))
    return {"model": "PRiMeFlow U-Net" if spec["architecture"] == "unet" else "PRiMeFlow MLP", "preset": preset,
            "batch": batch, "device": str(device), "precision": precision_label(precision, device),
            "measured": ms, "unit": "ms/step", "card": None, "card_unit": None,
            "card_note": "paper gives no training time (Appendix E: batch, GPUs, accumulation only)",
            "ratio": None, "n_params": n_params(field), "n_genes": n_genes,
            "cells_per_s": batch / r["seconds_per_step"],
            "one_gpu_ms_per_update": ms * micro,
            "update_note": f"one optimiser update = {tr.get('num_gpus', 1)} GPUs x {tr.get('grad_accum_steps', 1)} "
                           f"accumulation = {micro} micro-batches of {batch}", "detail": r}


# ------------------------------------------------------------------ 4. scLDM
def bench_scldm(preset: str, quick: bool, device, steps: int, warmup: int, budget: float) -> dict:
    import torch

    from perturb_repro.models._scldm_nets import DiT

    p = load_presets("scldm")[preset]
    ae, fl = p["autoencoder"]["network"], p["flow"]
    tr = fl["training"]
    n_tokens, latent = int(ae["n_inducing_points"]), int(ae["n_embed_latent"])
    n_perts, cov_sizes = (40, [3] * len(p.get("covariates") or [])) if quick else SCLDM_CARD["condition_classes"]
    torch.manual_seed(0)
    dit = DiT(n_tokens, latent, n_perts, list(cov_sizes), fl["network"])
    batch = capped(int(tr["batch_size"]))
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(batch, n_tokens, latent, generator=g).to(device)  # autoencoder latents of a batch of cells
    tok = torch.randint(0, n_perts, (batch, 1), generator=g).to(device)
    cov = torch.stack([torch.randint(0, s, (batch,), generator=g) for s in cov_sizes], 1).to(device) if cov_sizes \
        else torch.zeros(batch, 0, dtype=torch.long, device=device)
    eps, p_drop = float(fl.get("train_eps", 1e-5)), float(fl.get("cfg_dropout_prob", 0.0))
    precision = precision_of(tr)

    def loss_fn(n, i):
        z0 = torch.randn_like(z1)  # flow from noise (card), linear path
        t = torch.rand(batch, device=device) * (1 - 2 * eps) + eps
        zt = (1 - t[:, None, None]) * z0 + t[:, None, None] * z1
        drop = torch.rand(batch, device=device) < p_drop
        return torch.nn.functional.mse_loss(n(zt, t, tok, cov, drop).float(), z1 - z0)

    step = torch_trainer(dit, list(dit.parameters()), str(tr.get("optimizer", "adamw")), float(tr["learning_rate"]),
                         precision, float(tr.get("grad_clip") or 0) or None, device, loss_fn)
    r = timed_loop(step, _sync(device), warmup, steps, budget)
    ms = 1e3 * r["seconds_per_step"]
    card_cells = card_figures()["scldm_cells_per_s_per_gpu"]
    card_ms = 1e3 * batch / card_cells
    return {"model": "scLDM DiT", "preset": preset, "batch": batch, "device": str(device),
            "precision": precision_label(precision, device), "measured": ms, "unit": "ms/step",
            "card": card_ms, "card_unit": "ms/step",
            "card_note": f"derived: {SCLDM_CARD['epochs']} epochs x {SCLDM_CARD['train_cells'] / 1e6:.1f}M train cells in "
                         f"{SCLDM_CARD['hours']:g} h on {SCLDM_CARD['gpu']} = {card_cells:.0f} cells/s/GPU, x batch {batch}",
            "ratio": card_ms / ms, "n_params": n_params(dit), "cells_per_s": batch / r["seconds_per_step"], "detail": r}


# ------------------------------------------------------------------ report
def fmt(v, unit) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.1f} {unit}" if v >= 10 else f"{v:.3g} {unit}"


def print_table(rows: list[dict], res: dict) -> None:
    m = res["machine"]
    print("\n" + "=" * 118)
    print(f"GPU benchmark{' (--quick: tiny presets, CPU smoke test; ratios are NOT meaningful)' if res['quick'] else ''}"
          f"  torch {m['torch']} ({m['torch_device']}), jax {m['jax']} ({m['jax_devices']})")
    print("ratio = measured throughput / card throughput (> 1: faster than the card)")
    print("=" * 118)
    head = f"{'model':<16} {'preset':<15} {'batch':>5}  {'precision':<36} {'measured':>15} {'card':>15} {'ratio':>7}"
    print(head)
    print("-" * 120)
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<16} {r['preset']:<15} {'':>5}  {'FAILED: ' + r['error'][:80]}")
            continue
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['model']:<16} {r['preset']:<15} {r['batch']:>5}  {r['precision'][:36]:<36} "
              f"{fmt(r['measured'], r['unit']):>15} {fmt(r['card'], r['card_unit'] or ''):>15} {ratio:>7}")
    print("-" * 120)
    for r in rows:
        if "error" in r:
            continue
        extra = ""
        if "projected_hours_card_budget" in r:
            extra = f"; card budget at this speed: {r['projected_hours_card_budget']:.2f} h"
        if "one_gpu_ms_per_update" in r:
            extra = f"; {r['update_note']}: {r['one_gpu_ms_per_update']:,.0f} ms per update on one device"
        if "cells_per_s" in r:
            extra += f"; {r['cells_per_s']:,.0f} cells/s"
        print(f"  {r['model']}: {r['n_params']:,} parameters, {r['detail']['timed_steps']} timed steps after "
              f"{r['detail']['warmup_steps']} warm-up, card: {r['card_note']}{extra}")
    via = res["imported_by_cellflow_tools"]
    print(f"  snakemake / scanpy / cell_eval imported by this benchmark or the project's modules: "
          f"{', '.join(res['forbidden_imports']) or 'none'}"
          + (f" ({', '.join(via)} only by cellflow-tools itself, its declared dependency)" if via else "")
          + f"; total {res['total_seconds']:.1f} s")
    print("=" * 118)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny presets, a few steps: CPU smoke test (< 1 min)")
    ap.add_argument("--device", default="auto", help="torch device: auto (cuda if visible) | cuda | cuda:1 | cpu")
    ap.add_argument("--allow-cpu", action="store_true", help="run the paper presets without a GPU (very slow)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model (default 200 CellFlow, 30 others; quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; quick 1)")
    ap.add_argument("--budget", type=float, default=60.0, help="stop timing a model after this many seconds (default 60)")
    ap.add_argument("--cellflow-preset", default=None)
    ap.add_argument("--scgpt-preset", default=None)
    ap.add_argument("--primeflow-preset", default=None)
    ap.add_argument("--scldm-preset", default=None)
    ap.add_argument("--batch-cap", type=int, default=None,
                    help="cap every batch at N (checks the paper networks build and step on a small machine; not a benchmark)")
    ap.add_argument("--only", nargs="*", choices=["cellflow", "scgpt", "primeflow", "scldm"], default=None)
    ap.add_argument("--out", default="results/bench/bench_gpu.json", help="JSON output (default: %(default)s)")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    if device.type != "cuda" and not (args.quick or args.allow_cpu):
        print("bench_gpu: torch sees no GPU (torch.cuda.device_count() = 0); the paper presets would take hours on CPU.\n"
              "  Install the GPU environment (envs/requirements-gpu.txt, README 'Cluster') and run on a GPU node,\n"
              "  or use --quick (smoke test) / --allow-cpu.", file=sys.stderr)
        return 2
    quick = args.quick
    global BATCH_CAP
    BATCH_CAP = args.batch_cap
    steps_cf = args.steps or (5 if quick else 200)
    steps = args.steps or (5 if quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 5)
    if quick:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    presets = {
        "cellflow": args.cellflow_preset or ("tiny" if quick else "paper"),
        "scgpt": args.scgpt_preset or ("tiny" if quick else "paper_replogle"),
        "primeflow": args.primeflow_preset or ("tiny" if quick else "paper_norman19"),
        "scldm": args.scldm_preset or ("tiny" if quick else "paper"),
    }
    only = set(args.only or presets)
    results: dict[str, dict] = {}

    def run(key, fn):
        if key not in only:
            return
        print(f"[bench_gpu] {key} ({presets[key]}) ...", flush=True)
        t0 = time.perf_counter()
        try:
            results[key] = fn()
        except Exception as exc:  # one failing model still leaves the others' rows
            import traceback

            traceback.print_exc()
            results[key] = {"model": key, "preset": presets[key], "error": f"{type(exc).__name__}: {exc}"}
        results[key]["section_seconds"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # torch models first: JAX keeps what it allocates until the process ends
    run("scgpt", lambda: bench_scgpt(presets["scgpt"], device, steps, warmup, args.budget))
    run("primeflow", lambda: bench_primeflow(presets["primeflow"], quick, device, steps, warmup, args.budget))
    run("scldm", lambda: bench_scldm(presets["scldm"], quick, device, steps, warmup, args.budget))
    before_cellflow = sorted(m for m in FORBIDDEN if m in sys.modules)  # the project's own modules + torch
    run("cellflow", lambda: bench_cellflow(presets["cellflow"], quick, steps_cf, warmup, args.budget))
    # cellflow-tools itself imports scanpy (cellflow/__init__ -> preprocessing): a declared dependency of it
    from importlib.metadata import requires

    cellflow_deps = {r.split(";")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower().replace("-", "_")
                     for r in (requires("cellflow-tools") or []) if "extra ==" not in r}
    after = sorted(m for m in FORBIDDEN if m in sys.modules)
    forbidden = sorted(set(before_cellflow) | {m for m in after if m not in cellflow_deps})
    via_cellflow = sorted(m for m in after if m in cellflow_deps and m not in before_cellflow)

    import jax

    res = {
        "quick": quick,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_device": str(device) + (
                        f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
                    "torch_cuda_device_count": torch.cuda.device_count(),
                    "jax": jax.__version__, "jax_devices": ", ".join(str(d) for d in jax.devices())},
        "card_figures": card_figures(), "presets": presets, "args": vars(args),
        "forbidden_imports": forbidden, "imported_by_cellflow_tools": via_cellflow,
        "results": [results[k] for k in ("cellflow", "scgpt", "primeflow", "scldm") if k in results],
    }
    res["total_seconds"] = time.perf_counter() - started
    print_table(res["results"], res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {out}")
    failed = [r for r in res["results"] if "error" in r]
    return 1 if failed or res["forbidden_imports"] else 0


if __name__ == "__main__":
    sys.exit(main())
