"""The HTTP application: webhook ingest, read API and health checks."""
