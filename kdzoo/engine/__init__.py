"""Training engine: trainer loop, optimisers and schedules, checkpoints, logging, distributed."""
