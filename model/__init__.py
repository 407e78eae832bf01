"""The MegActor diffusion model and its sampling pipeline, built on diffusers."""
