"""ovd_jax.models."""
