"""Representation consolidation (paper 001): a multi-head student distilled on unlabeled proxy
data from task-specific teachers and a generalist, so that its backbone transfers to new tasks
better than any teacher's."""
