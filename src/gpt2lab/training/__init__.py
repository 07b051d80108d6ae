"""Training and fine-tuning: token shards, the trainer loop, optimizer and schedule,
multi-process runs, and the research recipes (embeddings-only, LayerNorm removal)."""
