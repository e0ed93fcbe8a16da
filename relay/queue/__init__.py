"""Queue mode's decisions, pure: when to try a recipient again, when to give it up, how fast
to send (relay/store/queue.py keeps the queue, relay/smtp/delivery.py delivers it)."""
