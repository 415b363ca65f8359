"""Reproduce published single-cell perturbation-prediction results (CellFlow, scGPT, scLDM, PRiMeFlow)."""

__version__ = "0.1.0"
