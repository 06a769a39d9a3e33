"""Clients of Distribution registries (pull and push for the layer store)."""
