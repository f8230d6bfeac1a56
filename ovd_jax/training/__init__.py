"""ovd_jax.training."""
