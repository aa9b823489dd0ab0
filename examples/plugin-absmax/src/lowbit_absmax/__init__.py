"""Example plugin for lowbit-harness (see README "Adding a method")."""
