"""The gRPC door: server lifecycle, servicer, auth, status mapping, proto conversion, metrics
(docs/ARCHITECTURE.md)."""
