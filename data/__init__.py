"""ldot data package."""
