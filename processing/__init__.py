"""Processing side of PerceptionGPT: processor, templates, collator, datasets and metrics.

Nothing here imports the modeling package or the trainer (see DESIGN.md, "Layout").
"""
