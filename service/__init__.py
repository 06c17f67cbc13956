"""inngest-outbox: an aiohttp service with a durable transactional outbox for Inngest."""

__version__ = "0.1.0"
