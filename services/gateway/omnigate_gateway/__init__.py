"""Omnigate gateway."""
