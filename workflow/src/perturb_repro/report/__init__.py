"""Self-contained HTML reproduction report and the figures it inlines."""

from __future__ import annotations

from perturb_repro.report.figures import loss_curve, metric_distribution, pca_predicted_vs_real
from perturb_repro.report.html import build_report

__all__ = ["build_report", "loss_curve", "metric_distribution", "pca_predicted_vs_real"]
