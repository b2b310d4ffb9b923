"""Helpers for tests (keras_irtf's own and users'): small datasets drawn in the official layouts
and a tiny random BERT in TF-Hub and keras-hub formats."""
