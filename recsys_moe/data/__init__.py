"""Model-ready shards → batches of (dense, KeyedJaggedTensor, labels)."""
