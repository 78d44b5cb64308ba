"""recsys-moe: multi-task ranking with Mixture-of-Experts on TorchRec.

One package, a folder per layer of the flow, each importing only from the layers before it:
features (specs) → pipelines (Polars) → kernels → data → model → tracking → training →
distributed → scoring → registry → serving, then the entry points (retrain, demo, cli).
"""

__version__ = "0.1.0"
