"""Ready-made run configs (YAML) and the runner behind `fedtune simulate`."""
