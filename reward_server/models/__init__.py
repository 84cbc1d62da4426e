"""The model layer: loading checkpoints and running batched forwards. Imports no grpc."""
