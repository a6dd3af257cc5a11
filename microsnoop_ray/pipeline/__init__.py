"""The Ray Data plate pipeline (Ray is used only in this package and in ``jobs/``)."""
