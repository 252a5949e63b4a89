"""Training: state, optimizer, losses, steps, evaluation, metrics and the loop."""
