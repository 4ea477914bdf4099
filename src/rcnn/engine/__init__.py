"""Training machinery: devices and precision, checkpoints, optimisers and schedules, resume points, live curves,
the two-stage trainer."""
