"""End-to-end experiments built from the library's tasks (each is a task: `config.task`)."""
