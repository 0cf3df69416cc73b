"""fedtune clients package."""
