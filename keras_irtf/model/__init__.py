"""The retrieval model and what trains it: ComposedRetrievalModel, the losses, gradient
augmentation (the paper's method and its baselines) and the optimizer helpers."""
