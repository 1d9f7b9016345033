"""torch.library glue, one module per op family."""
