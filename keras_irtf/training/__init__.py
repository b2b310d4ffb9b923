"""Training runs: the fit loop behind tools/train.py, crash-safe backups, callbacks,
tf.distribute support and the ablation grid."""
