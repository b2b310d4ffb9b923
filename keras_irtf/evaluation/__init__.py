"""Evaluation: the Recall@K protocols, chunked top-k retrieval, metrics (Recall@K, WHM) and the
WHM-against-alpha plot."""
