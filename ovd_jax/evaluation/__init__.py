"""ovd_jax.evaluation."""
