"""Super-resolution and restoration with diffusion."""
