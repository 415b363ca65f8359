"""Networks of scLDM (models/scldm.py): the transformer autoencoder with inducing points, its
negative-binomial head, the DiT velocity field with adaLN-zero conditioning, CFG and Euler.

Written after czi-ai/scldm (src/scldm/layers.py, nnets.py, vae.py, stochastic_layers.py,
transport/path.py); own code, same structure:

* ``Block``: pre-LN transformer block, SwiGLU MLP (hidden = multiple_of-rounded 2/3 * 4 * n_embed,
  no biases), optional adaLN modulation (6 * n_embed shift/scale/gate from the conditioning vector).
* ``CrossAttentionBlock``: queries (learned inducing points, or given queries) attend to a token set;
  residual on the queries, then a SwiGLU MLP.
* Encoder: the cell's expressed genes as tokens (upstream ``sample_genes: expressed``; here padded
  to the batch maximum and masked out of attention, upstream pads with a mask token) or all genes
  (``sample_genes: all``) -> cross-attention onto ``n_inducing_points`` learned queries -> ``n_layer``
  self-attention blocks -> Linear to ``n_embed_latent`` + LayerNorm without affine (the latent is a
  deterministic set of M x d tokens, each layer-normalised).
* Decoder: LayerNorm + Linear back to ``n_embed`` -> ``n_layer`` blocks -> cross-attention with the
  (shared) gene embeddings as queries -> per-gene vector -> NB head: Linear(n_embed, 1) logits,
  mean = softmax over genes x library size, inverse dispersion theta = exp(per-gene parameter)
  ("negative_binomial_shared_theta", initialised to 1 as upstream).
* DiT: Linear(n_embed_latent -> n_embed) + fixed 1-D sin-cos positions over the M latent tokens,
  ``n_layer`` adaLN blocks (zero-initialised modulation = adaLN-zero), final adaLN layer (zero init).
  Conditioning vector = timestep embedding (sinusoidal 256 -> MLP) + condition embedding.

Deviations: attention by ``F.scaled_dot_product_attention`` (upstream: flex_attention, same maths);
the encoder's positional embedding (upstream an all-zero frozen parameter when enabled) is dropped;
the ``softbin`` value encoding reads log1p(counts) instead of raw counts (raw counts in the
thousands saturate its first layer); condition embedding is this project's generalisation of the
upstream "joint" strategy (sum of per-gene perturbation embeddings, so combinations compose, + one
embedding per covariate column; ids < 0 contribute nothing; CFG replaces the whole sum by a learned
null vector, the joint strategy's single drop mask).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._flow import count_parameters, euler_integrate, guided_velocity  # noqa: F401 (re-exported)

# ------------------------------------------------------------------------------------------------
# transformer pieces


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SwiGLU(nn.Module):
    def __init__(self, n_embed: int, multiple_of: int):
        super().__init__()
        hidden = int(2 * (4 * n_embed) / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(n_embed, hidden, bias=False)
        self.w2 = nn.Linear(n_embed, hidden, bias=False)
        self.proj = nn.Linear(hidden, n_embed, bias=False)

    def forward(self, x):
        return self.proj(F.silu(self.w1(x)) * self.w2(x))


class SelfAttention(nn.Module):
    def __init__(self, n_embed: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        if n_embed % n_head:
            raise ValueError(f"n_embed {n_embed} is not a multiple of n_head {n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embed, 3 * n_embed, bias=bias)
        self.proj = nn.Linear(n_embed, n_embed, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, s, d)))


class CrossAttention(nn.Module):
    def __init__(self, n_embed: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        if n_embed % n_head:
            raise ValueError(f"n_embed {n_embed} is not a multiple of n_head_cross {n_head}")
        self.n_head = n_head
        self.kv = nn.Linear(n_embed, 2 * n_embed, bias=bias)
        self.q = nn.Linear(n_embed, n_embed, bias=bias)
        self.proj = nn.Linear(n_embed, n_embed, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, q, key_mask=None):
        b, s, d = x.shape
        m = q.shape[1]
        h = self.n_head
        k, v = self.kv(x).view(b, s, 2, h, d // h).permute(2, 0, 3, 1, 4)
        qq = self.q(q).view(q.shape[0], m, h, d // h).transpose(1, 2)
        if qq.shape[0] != b:
            qq = qq.expand(b, -1, -1, -1)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S], True = attend
        y = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, m, d)))


class Block(nn.Module):
    """Pre-LN self-attention block; with ``adaln`` the norms are modulated by the condition (DiT)."""

    def __init__(self, n_embed: int, n_head: int, dropout: float, bias: bool, multiple_of: int, eps: float,
                 adaln: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embed, eps=eps, elementwise_affine=not adaln)
        self.ln_2 = nn.LayerNorm(n_embed, eps=eps, elementwise_affine=not adaln)
        self.attn = SelfAttention(n_embed, n_head, dropout, bias)
        self.mlp = SwiGLU(n_embed, multiple_of)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(n_embed, 6 * n_embed)) if adaln else None

    def forward(self, x, c=None):
        if self.adaln is None:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        sh1, sc1, g1, sh2, sc2, g2 = self.adaln(c).chunk(6, dim=-1)
        x = x + g1 * self.attn(_modulate(self.ln_1(x), sh1, sc1))
        return x + g2 * self.mlp(_modulate(self.ln_2(x), sh2, sc2))


class CrossAttentionBlock(nn.Module):
    """out = q + CrossAttn(LN(x), LN(q)); out += MLP(LN(out)). Learned queries if n_queries > 0."""

    def __init__(self, n_embed: int, n_queries: int, n_head: int, dropout: float, bias: bool, multiple_of: int,
                 eps: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, n_embed)) if n_queries else None
        self.ln_x = nn.LayerNorm(n_embed, eps=eps)
        self.ln_q = nn.LayerNorm(n_embed, eps=eps)
        self.attn = CrossAttention(n_embed, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embed, eps=eps)
        self.mlp = SwiGLU(n_embed, multiple_of)

    def forward(self, x, q=None, key_mask=None):
        if q is None:
            q = self.queries.unsqueeze(0)
        out = q + self.attn(self.ln_x(x), self.ln_q(q), key_mask)
        return out + self.mlp(self.ln_2(out))


# ------------------------------------------------------------------------------------------------
# stage 1: autoencoder


class ValueEncoding(nn.Module):
    """Gene embedding combined with the cell's count of that gene.

    ``log1p``: e_g * log1p(c) (upstream default); ``softbin``: e_g + softmax(MLP(log1p c)) @ bins."""

    def __init__(self, n_embed: int, kind: str, n_bins: int = 10, hidden: int = 64):
        super().__init__()
        self.kind = kind
        if kind == "softbin":
            self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, n_bins))
            self.bins = nn.Parameter(torch.randn(n_bins, n_embed))
        elif kind != "log1p":
            raise ValueError(f"input_aggregation must be log1p or softbin, not {kind!r}")

    def forward(self, gene_emb, counts):
        lc = torch.log1p(counts).unsqueeze(-1)
        if self.kind == "log1p":
            return gene_emb * lc
        return gene_emb + torch.softmax(self.mlp(lc), dim=-1) @ self.bins


def expressed_tokens(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, G] counts -> gene ids [B, S], counts [B, S] and mask [B, S] of each cell's expressed genes
    in gene order, padded to the batch's largest number S (>= 1; a cell without counts attends to
    one zero-count token so that attention stays defined)."""
    nz = counts > 0
    n = nz.sum(1)
    s = max(int(n.max()) if counts.shape[0] else 1, 1)
    ids = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :s]
    mask = torch.arange(s, device=counts.device)[None, :] < n[:, None]
    mask[:, 0] = True
    return ids, counts.gather(1, ids), mask


class Autoencoder(nn.Module):
    """counts [B, G] -> latent [B, M, d] -> (NB mean [B, G], theta [G])."""

    def __init__(self, n_genes: int, net: Mapping[str, Any]):
        super().__init__()
        e = int(net["n_embed"])
        m = int(net["n_inducing_points"])
        d = int(net["n_embed_latent"])
        n_layer, n_head, n_cross = int(net["n_layer"]), int(net["n_head"]), int(net["n_head_cross"])
        dropout, bias, mult = float(net.get("dropout", 0.0)), bool(net.get("bias", False)), int(net.get("multiple_of", 4))
        eps = float(net.get("layernorm_eps", 1e-8))
        self.n_genes, self.n_latent_tokens, self.latent_dim = n_genes, m, d
        self.sample_genes = str(net.get("sample_genes", "expressed"))
        if self.sample_genes not in ("expressed", "all"):
            raise ValueError(f"sample_genes must be expressed or all, not {self.sample_genes!r}")
        self.gene_embedding = nn.Embedding(n_genes, e)  # shared by encoder input and decoder queries
        self.value = ValueEncoding(e, str(net.get("input_aggregation", "log1p")), int(net.get("softbin_bins", 10)),
                                   int(net.get("softbin_hidden", 64)))
        self.enc_cross = CrossAttentionBlock(e, m, n_cross, dropout, bias, mult, eps)
        self.enc_blocks = nn.ModuleList([Block(e, n_head, dropout, bias, mult, eps) for _ in range(n_layer)])
        self.to_latent = nn.Sequential(nn.Linear(e, d, bias=bias), nn.LayerNorm(d, eps=eps, elementwise_affine=False))
        self.from_latent = nn.Sequential(nn.LayerNorm(d, eps=eps, elementwise_affine=False), nn.Linear(d, e, bias=bias))
        self.dec_blocks = nn.ModuleList([Block(e, n_head, dropout, bias, mult, eps) for _ in range(n_layer)])
        self.dec_cross = CrossAttentionBlock(e, 0, n_cross, dropout, bias, mult, eps)
        self.head = nn.Linear(e, 1, bias=True)
        self.log_theta = nn.Parameter(torch.ones(n_genes))  # theta = exp(1) at init, as upstream

    def encode(self, counts: torch.Tensor) -> torch.Tensor:
        if self.sample_genes == "expressed":  # only the cell's expressed genes are tokens (padded, masked)
            ids, vals, mask = expressed_tokens(counts)
            h = self.value(self.gene_embedding(ids), vals)  # [B, S, E]
            z = self.enc_cross(h, key_mask=mask)
        else:
            h = self.value(self.gene_embedding.weight.unsqueeze(0), counts)  # [B, G, E]
            z = self.enc_cross(h)
        for blk in self.enc_blocks:
            z = blk(z)
        return self.to_latent(z)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z)
        for blk in self.dec_blocks:
            h = blk(h)
        out = self.dec_cross(h, self.gene_embedding.weight.unsqueeze(0))  # [B, G, E]
        return self.head(out).squeeze(-1)

    def decode(self, z: torch.Tensor, library: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NB mean = softmax(logits over genes) * library size; theta per gene."""
        mu = torch.softmax(self.decode_logits(z), dim=-1) * library.reshape(-1, 1)
        return mu, self.log_theta.exp()

    def forward(self, counts, library):
        return self.decode(self.encode(counts), library)


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """log NB(x; mean mu, inverse dispersion theta): Var = mu + mu^2 / theta (scVI's log_nb_positive)."""
    log_theta_mu = torch.log(theta + mu + eps)
    return (theta * (torch.log(theta + eps) - log_theta_mu) + x * (torch.log(mu + eps) - log_theta_mu)
            + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))


def nb_loss(counts: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Reconstruction loss as upstream: -log-likelihood summed over genes, mean over cells."""
    return -nb_log_prob(counts, mu, theta).sum(dim=-1).mean()


# ------------------------------------------------------------------------------------------------
# stage 2: DiT velocity field


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def sincos_positions(dim: int, n: int) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.arange(n, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


class ConditionEmbedding(nn.Module):
    """Joint condition: sum of perturbation-gene embeddings + one embedding per covariate value.

    ``tok`` [B, P] gene ids (-1: empty slot or a gene not seen in training -> contributes nothing);
    ``cov`` [B, K] value ids per covariate (-1: unseen value -> nothing). ``drop`` [B] bool replaces
    the whole embedding by the learned null vector (classifier-free guidance)."""

    def __init__(self, n_perts: int, cov_sizes: list[int], dim: int):
        super().__init__()
        self.pert = nn.Embedding(max(n_perts, 1), dim)
        self.covs = nn.ModuleList([nn.Embedding(max(s, 1), dim) for s in cov_sizes])
        self.null = nn.Parameter(torch.zeros(dim))
        for emb in [self.pert, *self.covs]:
            nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.null, std=0.02)

    def forward(self, tok, cov, drop=None):
        h = (self.pert(tok.clamp(min=0)) * (tok >= 0).unsqueeze(-1)).sum(1)
        for k, emb in enumerate(self.covs):
            idx = cov[:, k]
            h = h + emb(idx.clamp(min=0)) * (idx >= 0).unsqueeze(-1)
        if drop is not None:
            h = torch.where(drop[:, None], self.null.expand_as(h), h)
        return h


class DiT(nn.Module):
    """v(z_t, t, c) over the M x d latent tokens; adaLN-zero blocks conditioned on emb(t) + emb(c)."""

    def __init__(self, n_tokens: int, latent_dim: int, n_perts: int, cov_sizes: list[int], net: Mapping[str, Any]):
        super().__init__()
        e = int(net["n_embed"])
        dropout, bias, mult = float(net.get("dropout", 0.0)), bool(net.get("bias", True)), int(net.get("multiple_of", 4))
        eps = float(net.get("layernorm_eps", 1e-8))
        self.freq_dim = int(net.get("frequency_embedding_size", 256))
        self.t_mlp = nn.Sequential(nn.Linear(self.freq_dim, e), nn.SiLU(), nn.Linear(e, e))
        self.cond = ConditionEmbedding(n_perts, cov_sizes, e)
        self.input_proj = nn.Linear(latent_dim, e, bias=bias)
        self.register_buffer("pos", torch.from_numpy(sincos_positions(e, n_tokens)).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([Block(e, int(net["n_head"]), dropout, bias, mult, eps, adaln=True)
                                     for _ in range(int(net["n_layer"]))])
        self.final_norm = nn.LayerNorm(e, eps=eps, elementwise_affine=False)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(e, 2 * e, bias=bias))
        self.final = nn.Linear(e, latent_dim, bias=bias)
        self._init()

    def _init(self):
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        nn.init.normal_(self.t_mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_mlp[2].weight, std=0.02)
        for lin in [*(b.adaln[-1] for b in self.blocks), self.final_adaln[-1], self.final]:  # adaLN-zero
            nn.init.zeros_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, z, t, tok, cov, drop=None):
        c = self.t_mlp(timestep_embedding(t, self.freq_dim)) + self.cond(tok, cov, drop)
        c = c.unsqueeze(1)
        x = self.input_proj(z) + self.pos
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.final_adaln(c).chunk(2, dim=-1)
        return self.final(_modulate(self.final_norm(x), shift, scale))


