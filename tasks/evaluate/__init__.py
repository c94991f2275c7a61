"""Evaluation: what is scored on a (possibly edited) model. CounterFact metrics, fluency and
held-out perplexity (`metrics.py`), neighbourhood prompts for specificity (`neighbours.py`),
the lm-eval capability suite (`capability.py`, named suites in `capability_profiles.yaml`,
local task YAMLs in `lmeval/`)."""
