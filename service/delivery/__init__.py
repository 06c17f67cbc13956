"""Delivery of outbox rows to Inngest's event API."""
