"""Crop stage: cell-region windows, tiles and rescaling (``windows``), and one field
to crops (``field``)."""
