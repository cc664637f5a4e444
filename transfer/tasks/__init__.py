"""Builders of task datasets from raw sources whose licences keep them out of the repository."""
