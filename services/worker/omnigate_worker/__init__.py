"""Omnigate worker."""
