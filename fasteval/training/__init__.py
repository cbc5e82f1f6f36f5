"""``fasteval train``: the classic fine-tuning loop with exact, sync-free per-epoch metrics."""
