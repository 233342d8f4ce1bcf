"""lcm_kit: Latent Consistency Models for diffusers."""
