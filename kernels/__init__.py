"""ldot kernels package."""
