"""Training: losses, the shared loop, teacher data."""
