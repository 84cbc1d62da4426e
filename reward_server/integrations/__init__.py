"""Drop-ins for the trainers people already run (docs/INTEGRATIONS.md).

- `reward_server.integrations.trl`: `RemoteReward` / `AsyncRemoteReward` for TRL's
  ``GRPOTrainer`` / ``RLOOTrainer`` ``reward_funcs``;
- `reward_server.integrations.verl`: an async ``compute_score`` for veRL's custom reward function.

They use the client library only (grpcio, protobuf, numpy: no torch, and neither TRL nor veRL is
imported), so they run wherever the trainer runs.
"""
