"""ovd_jax.losses."""
