"""Hand-crafted per-cell measurements computed beside the embeddings (CellProfiler's, via cp-measure)."""
