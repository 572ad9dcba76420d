"""PostgreSQL access: connections, the embedded server and migrations."""
