from core_jax.cli import main

main()
