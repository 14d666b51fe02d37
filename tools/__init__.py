"""ponder: tools."""
