"""Masked-image pretraining (docs/METHOD.md section 2): masking, data pool, training loop."""
