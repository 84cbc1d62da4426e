"""The engine: served models (registry), calibration, dynamic batching, combination rules,
and the engine that answers requests (docs/ARCHITECTURE.md). Imports no grpc."""
