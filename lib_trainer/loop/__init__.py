"""The training loop, its hooks, learning-rate schedules, and checkpoint sidecars."""
