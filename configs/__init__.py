"""ponder: configs."""
