"""Training side of PerceptionGPT: Trainer subclass, PEFT recipe, generation-based evaluation, CLI."""
