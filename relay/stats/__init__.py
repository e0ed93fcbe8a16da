"""Statistics: the maths (pure), counters kept on write, the queries that read them."""
