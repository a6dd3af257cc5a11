"""Masked-image pretraining (METHOD.md section 2): masking, data pool, training loop."""
