"""Shared code for the numbered pipeline stages; each module owns one concern."""
