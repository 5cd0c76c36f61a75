"""The test-time-compute co-design study: does a model trained on aggregation prompts gain more from Markovian RSA?

task.py  the synthetic task (modular chains with chain-of-thought) and the aggregation examples
run.py   corpora -> two trainings -> evaluations (single sample, majority@N, RSA, Markovian RSA) -> JSON + table
plot.py  accuracy against generated tokens per problem, from the JSON only
"""
