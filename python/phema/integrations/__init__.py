"""Callbacks that run a `PostHocEMA` inside a training framework (docs/integrations.md).

`phema.integrations.lightning.PostHocEMACallback` (Lightning) and
`phema.integrations.transformers.PostHocEMACallback` (Hugging Face `Trainer`); each module
imports its framework when it is imported itself, never `import phema`.
"""
