"""Integrations with training frameworks and trackers; each imports its framework lazily."""
