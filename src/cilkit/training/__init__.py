"""The training runtime: the device and its stores, the configured stage of a task, and the one loop."""
