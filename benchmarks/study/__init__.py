"""The loss-versus-bytes study of issue 13: run.py (one run), plan.py (the order, a time budget), report.py."""
