"""PerceptionGPT: boxes and masks from a `<vis>` token, as a transformers plugin."""
