"""Lightning training for each stage."""
