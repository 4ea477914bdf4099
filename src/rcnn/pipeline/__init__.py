"""What the DVC stages call: params, the family registry, the evaluate stage, the features stage's shared output."""
