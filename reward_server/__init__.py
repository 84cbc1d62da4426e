"""Reward-model serving microservice: gRPC, dynamic batching, reference log-probs, RM training.

Importing this package (and `reward_server.client`) does not import torch.
"""

__version__ = "0.1.0"
