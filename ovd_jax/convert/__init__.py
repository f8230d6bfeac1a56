"""ovd_jax.convert."""
