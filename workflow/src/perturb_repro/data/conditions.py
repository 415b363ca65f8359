"""Condition labels: 'A', 'A+B', 'A+ctrl' -> the perturbed genes they name."""

from __future__ import annotations

from typing import Iterable

# GEARS writes single perturbations as 'A+ctrl'; that token is never a gene.
GEARS_CONTROL_TOKEN = "ctrl"


def genes_of(condition: str, control_label: str, delimiter: str = "+") -> list[str]:
    """Perturbed genes named by one condition label, in label order (empty for the control)."""
    if condition == control_label:
        return []
    return [g for g in condition.split(delimiter) if g not in (control_label, GEARS_CONTROL_TOKEN)]


def unique_genes(conditions: Iterable[str], control_label: str, delimiter: str = "+") -> list[str]:
    """Sorted unique perturbed genes over many labels."""
    return sorted({g for c in conditions for g in genes_of(c, control_label, delimiter)})
