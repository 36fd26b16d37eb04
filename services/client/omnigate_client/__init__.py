"""Omnigate client."""
