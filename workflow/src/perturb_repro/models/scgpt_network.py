"""scGPT's ``TransformerGenerator`` (scgpt/model/generation_model.py, scgpt 0.2.4) in plain PyTorch.

Parameter names and shapes are scGPT's, so the official checkpoint maps onto it; native attention
(``use_fast_transformer=False``), no MVC decoder. ``GenePrior`` is not scGPT's: the card's +ESM run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class GeneEncoder(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(x))


class ContinuousValueEncoder(nn.Module):
    """Expression value -> vector: Linear(1, d), ReLU, Linear(d, d), LayerNorm, dropout; values
    clipped at ``max_value`` first."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_value: int = 512):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(x.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class ExprDecoder(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(d_model, d_model), nn.LeakyReLU(), nn.Linear(d_model, d_model), nn.LeakyReLU(), nn.Linear(d_model, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(-1)


class AffineExprDecoder(nn.Module):
    """scGPT's generator decoder without activation or adaptive bias: coeff(h) * value + bias(h)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.coeff_decoder = ExprDecoder(d_model)
        self.bias_decoder = ExprDecoder(d_model)

    def forward(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.coeff_decoder(x) * values + self.bias_decoder(x)


class ClsDecoder(nn.Module):
    def __init__(self, d_model: int, n_cls: int, nlayers: int = 3):
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(nlayers - 1):
            self._decoder.append(nn.Linear(d_model, d_model))
            self._decoder.append(nn.ReLU())
            self._decoder.append(nn.LayerNorm(d_model))
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class GenePrior(nn.Module):
    """Frozen per-gene vectors (``table``; row 0 means "no prior") projected to the model width.

    Not part of scGPT: the card's +ESM run. The projection starts at zero so the model begins as the
    pretrained one, and rows without a prior add nothing (not even the bias).
    """

    def __init__(self, n_rows: int, dim: int, d_model: int):
        super().__init__()
        self.register_buffer("table", torch.zeros(n_rows, dim))
        self.proj = nn.Linear(dim, d_model)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # Project the table, then look rows up: the same values as proj(table[rows]) (a linear map), but with
        # ESM2-15B's 5,120-wide rows over the whole vocabulary it avoids a (batch, 1,536, 5,120) gather and a
        # matmul ~15x larger per step (20k table rows vs 192 x 1,536 token slots).
        out = self.proj(self.table)[rows]
        return out * (rows > 0).unsqueeze(-1).to(out.dtype)


class TransformerGenerator(nn.Module):
    def __init__(
        self,
        ntoken: int,
        d_model: int,
        nhead: int,
        d_hid: int,
        nlayers: int,
        nlayers_cls: int = 3,
        n_cls: int = 1,
        dropout: float = 0.0,
        pad_token_id: int = 0,
        pert_pad_id: int = 2,
        prior_rows: int = 0,
        prior_dim: int = 0,
    ):
        super().__init__()
        self.d_model = d_model
        self.pad_token_id = pad_token_id
        self.pert_pad_id = pert_pad_id
        self.encoder = GeneEncoder(ntoken, d_model, padding_idx=pad_token_id)
        self.value_encoder = ContinuousValueEncoder(d_model, dropout)
        self.pert_encoder = nn.Embedding(3, d_model, padding_idx=pert_pad_id)
        layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = AffineExprDecoder(d_model)
        self.cls_decoder = ClsDecoder(d_model, n_cls, nlayers=nlayers_cls)
        self.gene_prior = GenePrior(prior_rows, prior_dim, d_model) if prior_rows else None
        # scGPT's init_weights: the gene embedding (all rows, the padding row too) ~ U(-0.1, 0.1)
        with torch.no_grad():
            self.encoder.embedding.weight.uniform_(-0.1, 0.1)

    def forward(
        self,
        src: torch.Tensor,
        values: torch.Tensor,
        pert_flags: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        prior_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, seq) token ids, values and flags -> (batch, seq) predicted expression."""
        genes = self.encoder(src)
        if self.gene_prior is not None and prior_rows is not None:
            genes = genes + self.gene_prior(prior_rows)
        total = genes + self.value_encoder(values) + self.pert_encoder(pert_flags)
        hidden = self.transformer_encoder(total, src_key_padding_mask=key_padding_mask)
        return self.decoder(hidden, values)


ARCH_KEYS = ("ntoken", "d_model", "nhead", "d_hid", "nlayers", "nlayers_cls", "n_cls", "dropout", "pad_token_id", "pert_pad_id")


def build_network(arch: Mapping[str, Any], prior_rows: int = 0, prior_dim: int = 0) -> TransformerGenerator:
    return TransformerGenerator(**{k: arch[k] for k in ARCH_KEYS}, prior_rows=prior_rows, prior_dim=prior_dim)

