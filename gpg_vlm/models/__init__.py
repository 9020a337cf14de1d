"""The policy model: family facts, tensor containers, the training forward and the adapter.

- `family`: what differs between Qwen-VL families (one `FamilyFacts` entry per family);
- `batch`: `Sample`, `PromptBatch`, `Rollout` and `micro_batches`;
- `forward`: `policy_scores` (the one tempered, masked score function) and `TokenScorer`;
- `adapter`: `VLMAdapter`, loading a checkpoint and encoding prompts.

Importing this package is light (no torch, no transformers): import the module you need.
"""
