"""ordertrail: an event-sourced record of Locally's cart item webhooks."""

__version__ = "0.1.0"
