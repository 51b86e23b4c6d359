"""Evaluators run inside training and by evaluate scripts; each returns a dict of named scalars."""
