"""Integrations of `svdkern.SVDTraining` with third-party training frameworks.

- `svdkern.integrations.transformers`: `SVDTrainingCallback` for transformers' `Trainer`.

Each module imports its framework when imported itself, never from `import svdkern`.
"""
