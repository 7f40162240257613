"""Evaluation: episode metrics over a paper setting for the policy, a model-free agent or a served model, the records and tables, and the training reports."""
