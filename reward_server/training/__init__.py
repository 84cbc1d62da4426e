"""Reward-model training: `reward-server train` (preference data -> a servable checkpoint).

Modules: `config` (TrainConfig), `data` (reading and validating preference records),
`batching` (tokenising and collating), `losses` (Bradley-Terry, centering), `modeling` (backbone,
LoRA, export), `trainer` (the loop), `plots`, `cli`.
"""
