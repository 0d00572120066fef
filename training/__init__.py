"""How any task is trained: the loop, optimizer, checkpoints, progress."""
