"""rlt_jax: Reinforcement-Learned Teachers (Cetin, Zhao, Tang; arXiv 2506.08388) in JAX/Flax."""
__version__ = "0.1.0"
