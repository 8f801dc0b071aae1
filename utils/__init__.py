"""Shared pieces of llmtrainer's entry scripts; each module has one concern."""
