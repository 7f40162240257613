"""Things that act in an environment: the VLM policy, experts, random agents, the tiny model factory."""
