"""ponder: train."""
