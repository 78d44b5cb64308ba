"""From a trained run to a registered, gated, aliased model: packaging as an MLflow pyfunc,
the promotion gate (`champion` / `challenger`), rollback and listing."""
