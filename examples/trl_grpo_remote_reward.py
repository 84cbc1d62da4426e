"""GRPO with TRL, rewards from the reward service (docs/INTEGRATIONS.md).

Offline, with the tiny checkpoints (a few seconds on a CPU)::

    python -m reward_server.tiny /tmp/tiny
    reward-server serve --reward-model /tmp/tiny/reward --port 50051 &
    python examples/trl_grpo_remote_reward.py --server 127.0.0.1:50051 --policy /tmp/tiny/reference

With a real policy and reward model, only ``--policy``, ``--server`` and ``--model`` change. Needs
``pip install trl`` (tested with trl 1.16.0).
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from reward_server.integrations.trl import AsyncRemoteReward, RemoteReward

PROMPTS = [
    "Is the sun a star?",
    "Name a colour of the sky.",
    "What do cats like to eat?",
    "Say something kind.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="127.0.0.1:50051", help="reward service address")
    ap.add_argument("--model", default="", help="reward model or combination ('' = default)")
    ap.add_argument("--policy", required=True, help="causal LM to train (path or hub id)")
    ap.add_argument("--chat", action="store_true", help="conversational prompts (messages)")
    ap.add_argument("--use-async", action="store_true", help="AsyncRemoteReward")
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--output-dir", default="runs/trl_grpo")
    args = ap.parse_args()

    # The one-line change: a reward function that calls the service.
    cls = AsyncRemoteReward if args.use_async else RemoteReward
    reward = cls(args.server, args.model, truncation="left", budget_seconds=120)

    rows = [{"prompt": [{"role": "user", "content": p}] if args.chat else p} for p in PROMPTS]
    config = GRPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=16,
        max_steps=args.max_steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=False,
    )
    trainer = GRPOTrainer(
        model=args.policy,
        reward_funcs=[reward],
        args=config,
        train_dataset=Dataset.from_list(rows),
    )
    trainer.train()
    for entry in trainer.state.log_history:
        if f"rewards/{reward.__name__}/mean" in entry:
            print(
                f"step {entry['step']}: rewards/{reward.__name__}/mean "
                f"{entry[f'rewards/{reward.__name__}/mean']:.4f}"
            )


if __name__ == "__main__":
    main()
