"""Per-resident activity models and reports (arrives with the analytics issue)."""
