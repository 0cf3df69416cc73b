"""fedtune server package."""
