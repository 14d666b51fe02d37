"""ponder: search."""
