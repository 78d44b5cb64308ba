"""Experiment tracking (MLflow) and the plots logged with each run."""
