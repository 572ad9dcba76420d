"""The append-only event store on PostgreSQL."""
