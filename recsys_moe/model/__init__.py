"""The model: TorchRec embeddings, stacked experts, gates and towers, one file per multi-task
architecture, and the full ranker (`ranker.MultiTaskRanker`) built from a manifest and a config."""
