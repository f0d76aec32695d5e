"""Device side of edgefl: the agent, its device runtimes and (later) outbox, link and trainer."""
