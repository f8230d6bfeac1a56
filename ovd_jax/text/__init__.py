"""ovd_jax.text."""
