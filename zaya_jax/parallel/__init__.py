"""Multi-device pieces: the expert-parallel MoE dispatch (expert.py) and multi-host start-up (distributed.py)."""
