"""Microshard datasets on the shared root and the leases that hand them to replicas."""
