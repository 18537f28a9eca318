"""ldot train package."""
