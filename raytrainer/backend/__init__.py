"""The only Ray Train wiring: the cluster, the warm worker group, its command channel, and what runs in a worker."""
