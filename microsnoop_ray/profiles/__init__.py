"""Profile post-processing: aggregation and control-fitted sphering (pure functions on DataFrames)."""
