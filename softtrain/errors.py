"""The error a run stops with (torch-free, so the command line can catch it without
importing torch)."""


class TrainingError(RuntimeError):
    """Training cannot start or had to stop (non-finite loss, refused resume); the message
    says why and what to do."""
