"""Galleries too large for an export's exact scan: an embedding pipeline (Apache Beam) and
approximate nearest-neighbour indexes (faiss) tied to the export that embedded them."""
