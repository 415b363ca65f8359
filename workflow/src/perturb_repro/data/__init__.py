"""Data stage: load and verify sources, split conditions, preprocess, fit PCA, write the scoring truth."""
