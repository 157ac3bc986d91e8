"""The run wing: everything a training run needs around the model (config schema, run directory,
trainer, metrics, checkpoints, evaluation, weights from Hugging Face). The model rooms never import it."""
