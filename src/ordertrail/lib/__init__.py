"""Settings, logging and errors shared by every part of the service."""
