"""ponder: tasks."""
