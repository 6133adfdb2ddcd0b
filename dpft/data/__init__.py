"""Tasks: where examples come from (embedded generator, hub, local files)."""
