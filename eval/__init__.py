"""ldot eval package."""
