-- Attempts to apply a redelivered input message, counted by the worker itself.
-- RabbitMQ's own delivery count also grows whenever a connection drops with the message
-- unacked (broker restart, network cut, a SIGKILLed worker): it cannot tell a message that
-- kills its worker from one that was merely in flight, so it must not be what dead-letters.
CREATE TABLE delivery_attempts (
    event_id        uuid PRIMARY KEY,
    attempts        integer NOT NULL,
    last_attempt_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_attempts_last ON delivery_attempts (last_attempt_at);
