"""Webhook tokens and API keys: creation, storage as digests, verification."""
