"""Adapters: one module per outside system (PostgreSQL, RabbitMQ, Redis). They do not import each other."""
