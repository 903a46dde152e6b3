"""The scPermut network and its objective: pure torch, no I/O, no Ray."""
