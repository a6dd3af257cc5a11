"""Encode stage: preprocessing (``preprocess``: centred padding, percentile
normalisation) and the encoder over images (``embed``)."""
