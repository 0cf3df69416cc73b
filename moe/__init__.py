"""fedtune moe package."""
