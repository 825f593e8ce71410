"""Persistence: SQLModel tables, explicit migrations, one transaction per domain operation."""
