"""Serving: SavedModel export for TF Serving and querying an export."""
