"""BAPO personalization service: the HTTP API."""
