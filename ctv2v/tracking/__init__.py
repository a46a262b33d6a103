"""MLflow tracking: runs, the model registry, the offline journal, system metrics."""
