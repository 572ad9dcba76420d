"""The item lifecycle: status vocabulary, transitions and the item aggregate."""
