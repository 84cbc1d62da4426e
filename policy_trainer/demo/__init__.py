"""`make demo`: the whole RLHF loop end to end on an embedded synthetic task (no downloads)."""
